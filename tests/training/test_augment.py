"""The geometric augmentation of training images (`efficientad train --augment geometric`) on real photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from efficientad.cli import main
from efficientad.errors import UserError
from tests.training.conftest import tiny_train_args
from training.augment import GEOMETRIC_MAX_ZOOM, random_geometric
from training.checkpoint import read_metadata
from training.data import load_images, scan_category
from training.train import TrainSettings

SIZE = 32  # small, so that every window of a photo can be enumerated


@pytest.fixture(scope="module")
def pool(cookie_dir: Path) -> torch.Tensor:
    paths = scan_category(cookie_dir).train_images[:4]
    return load_images(paths, 2 * SIZE)  # (4, 3, 64, 64) uint8


def _windows(pool: torch.Tensor) -> list[torch.Tensor]:
    """Every flip and every zoomed window (all positions, whole pixels) of each image, at SIZE."""
    found = []
    side = pool.shape[-1]
    for image in pool.split(1):
        for window in range(round(side / GEOMETRIC_MAX_ZOOM) - 1, side + 1):
            for top in range(side - window + 1):
                for left in range(side - window + 1):
                    crop = image[:, :, top : top + window, left : left + window].float() / 255.0
                    found.append(F.interpolate(crop, size=(SIZE, SIZE), mode="bilinear", antialias=True))
    return found


def test_geometric_is_seeded_shaped_and_in_range(pool: torch.Tensor) -> None:
    first = random_geometric(pool, SIZE, torch.Generator().manual_seed(3))
    again = random_geometric(pool, SIZE, torch.Generator().manual_seed(3))
    other = random_geometric(pool, SIZE, torch.Generator().manual_seed(4))
    assert first.shape == (4, 3, SIZE, SIZE) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0


def test_geometric_yields_flips_and_zooms_of_the_same_photo(pool: torch.Tensor) -> None:
    """Each output, un-flipped, is a window of its own photo of side 1/1.25 .. 1 resized to SIZE, and
    over many draws all four flip combinations and more than one zoom occur."""
    one = pool[:1]
    whole = F.interpolate(one.float() / 255.0, size=(SIZE, SIZE), mode="bilinear", antialias=True)
    candidates = _windows(one)
    generator = torch.Generator().manual_seed(0)
    flips_seen, exact_whole = set(), 0
    for _ in range(12):
        out = random_geometric(one, SIZE, generator)  # (1, 3, S, S)
        matched = False
        for flip_lr in (False, True):
            for flip_ud in (False, True):
                plain = out.flip(-1) if flip_lr else out
                plain = plain.flip(-2) if flip_ud else plain
                if any(torch.allclose(plain, window, atol=1e-5) for window in candidates):
                    flips_seen.add((flip_lr, flip_ud))
                    exact_whole += int(torch.allclose(plain, whole, atol=1e-5))
                    matched = True
        assert matched, "an augmented image is not a flipped window of its photo"
    assert len(flips_seen) >= 3
    assert exact_whole < 12  # zoomed in, not always the whole photo


def test_train_with_geometric_augmentation_records_it(tmp_path: Path, cookie_dir: Path) -> None:
    assert main(tiny_train_args(cookie_dir, tmp_path / "run", "--augment", "geometric", steps=2)) == 0
    assert read_metadata(tmp_path / "run")["training"]["augment"] == "geometric"
    with pytest.raises(UserError, match="--augment"):
        TrainSettings(augment="rotate").check()
