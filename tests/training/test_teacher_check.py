"""Teacher check: the pruned nearest-neighbour search is exact; on real cookie photos with a planted blurred
square, pretrained features (the Lite0 target, the distilled teacher) score it above a random PDN; seeded
runs repeat; bad inputs give clear errors; the CLI prints the table and writes the JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from efficientad.cli import main
from efficientad.errors import UserError
from training.data import load_images, scan_category
from training.images import load_rgb
from training.networks import PDN
from training.teacher_check import (
    CheckSettings,
    max_nearest_distances,
    nearest_distances,
    nearest_neighbour_scores,
    teacher_check,
    teacher_extractor,
)
from training.teacher_file import DEFAULT_TEACHER_PATH

SIZE = 64
FAST = {"image_size": SIZE, "memory_patches": 2000}


@pytest.fixture(scope="module")
def planted(cookie_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """samples/cookie's train/good; as test/good its 4 test photos and their mirror images (8), as
    test/planted the same 8 with the central 30% square blurred (Gaussian, radius 8 px of the photo)."""
    root = tmp_path_factory.mktemp("planted")
    shutil.copytree(cookie_dir / "train" / "good", root / "train" / "good")
    for folder in ("good", "planted"):
        (root / "test" / folder).mkdir(parents=True)
    for path in sorted((cookie_dir / "test" / "good").iterdir()):
        for mirrored in (False, True):
            image = load_rgb(path)
            image = image.transpose(Image.FLIP_LEFT_RIGHT) if mirrored else image
            name = f"{path.stem}{'-mirrored' if mirrored else ''}.png"
            image.save(root / "test" / "good" / name)
            side = int(0.3 * min(image.size))
            left, top = (image.width - side) // 2, (image.height - side) // 2
            box = (left, top, left + side, top + side)
            image.paste(image.crop(box).filter(ImageFilter.GaussianBlur(8)), box[:2])
            image.save(root / "test" / "planted" / name)
    return root


def test_pruned_search_equals_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    memory = torch.randn(3000, 32, generator=generator)  # (K, C)
    queries = memory[torch.randint(0, 3000, (5, 100), generator=generator)]  # (B, P, C) near the memory
    queries = queries + 0.1 * torch.randn(queries.shape, generator=generator)
    queries[1, 7] += 3.0  # planted outliers
    queries[3, :4] -= 2.0
    brute = torch.stack([nearest_distances(image, memory).max() for image in queries])  # (B,)
    for probe in (1, 50, 300, 3000, 5000):
        pruned = max_nearest_distances(queries, memory, probe=probe, block=8)
        torch.testing.assert_close(pruned, brute, rtol=1e-5, atol=1e-5)
    assert brute[1] > brute[0] and brute[3] > brute[2]


def test_pretrained_features_see_a_planted_blur_that_a_random_pdn_misses(planted: Path) -> None:
    random = teacher_check("random", planted, targets=["lite0"], **FAST)
    shipped = teacher_check(DEFAULT_TEACHER_PATH, planted, targets=[], **FAST)
    by_name = {source["name"]: source["image_auroc"] for source in random["sources"] + shipped["sources"]}
    assert random["test_images"] == 16 and random["anomalous_images"] == 8
    assert by_name["lite0"] >= 0.95  # measured 1.000: the target ranks every planted image above every good
    assert by_name["random"] <= 0.6  # measured 0.453: a random PDN does not see the blur
    assert by_name["teacher_small.safetensors"] >= by_name["random"] + 0.1  # measured 0.656
    assert [source["grid"] for source in random["sources"]] == [8, 16]  # unpadded PDN at 64 px; target grid


def test_seeded_memory_repeats_and_the_seed_matters(cookie_dir: Path) -> None:
    category = scan_category(cookie_dir)
    memory = load_images(category.train_images, SIZE)
    test = load_images([sample.path for sample in category.test_samples], SIZE)
    torch.manual_seed(0)
    extract = teacher_extractor(PDN().eval(), torch.device("cpu"))
    runs = [
        nearest_neighbour_scores(extract, memory, test, CheckSettings(SIZE, memory_patches=100, seed=seed))
        for seed in (0, 0, 1)
    ]
    assert runs[0][1] == {"grid": 8, "channels": 384, "memory_patches": 100}
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert not np.array_equal(runs[0][0], runs[2][0])  # another seed keeps other patches
    assert (runs[0][0] > 0).all()


def test_bad_inputs_are_user_errors(cookie_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"teacher weights not found: .*missing\.safetensors"):
        teacher_check(tmp_path / "missing.safetensors", cookie_dir, **FAST)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"cannot read teacher file .*foreign\.safetensors"):
        teacher_check(foreign, cookie_dir, **FAST)
    with pytest.raises(UserError, match="unknown target 'resnet50'"):
        teacher_check("random", cookie_dir, targets=["resnet50"], **FAST)
    train_only = tmp_path / "train_only"
    shutil.copytree(cookie_dir / "train", train_only / "train")
    with pytest.raises(UserError, match="needs both good and defective images"):
        teacher_check("random", train_only, **FAST)


def test_cli_prints_the_table_and_writes_json(
    cookie_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "check" / "result.json"
    args = ["teacher-check", "random", str(cookie_dir), "--image-size", str(SIZE)]
    args += ["--memory-patches", "500", "--target", "lite0-s8s16", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "image AUROC" in printed and "lite0-s8s16" in printed and f"results written to {out}" in printed
    result = json.loads(out.read_text())
    assert [(source["kind"], source["name"]) for source in result["sources"]] == [
        ("teacher", "random"),
        ("target", "lite0-s8s16"),
    ]
    assert result["settings"]["memory_patches"] == 500 and result["test_images"] == 10
    assert all(0.0 <= source["image_auroc"] <= 1.0 for source in result["sources"])

    assert main(["teacher-check", str(tmp_path / "nope.safetensors"), str(cookie_dir)]) == 2
    assert "error: teacher weights not found" in capsys.readouterr().err
