"""One training step's shortcuts (cached teacher features, smaller penalty crops) and the --recipe presets."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from efficientad.cli import main
from efficientad.errors import UserError
from efficientad.scores import default_threshold
from tests.training.conftest import NATURAL
from training.augment import random_color_jitter, random_penalty_crops
from training.images import load_image_tensor
from training.losses import penalty_loss
from training.model import EfficientAD, normalise_unit_images
from training.networks import PDN, Autoencoder
from training.train import (
    RECIPES,
    TrainingImages,
    TrainSettings,
    cached_teacher_features,
    load_saved_state,
    train_step,
)

SIZE = 64


@pytest.fixture(scope="module")
def model() -> EfficientAD:
    torch.manual_seed(0)
    return EfficientAD(
        PDN(size="small").eval(),
        PDN(size="small", out_channels=768),
        Autoencoder(out_channels=384, image_size=SIZE),
        image_size=SIZE,
    )


@pytest.fixture(scope="module")
def images() -> TrainingImages:
    paths = sorted(NATURAL.glob("*.jpg"))
    train = torch.stack([load_image_tensor(path, SIZE) for path in paths[:3]])  # (3, 3, 64, 64)
    pool = torch.stack([load_image_tensor(path, 2 * SIZE) for path in paths[3:6]])  # (3, 3, 128, 128)
    return TrainingImages(train=train, penalty_pool=pool)


def test_cached_teacher_features_give_the_losses_of_computed_ones(model: EfficientAD, images) -> None:
    features = cached_teacher_features(model, images.train, torch.device("cpu"))  # (3, 384, 8, 8)
    cached = replace(images, teacher_features=features)
    batch_with, teacher_st = cached.draw_batch(2, SIZE, torch.Generator().manual_seed(5))
    batch_without, none = images.draw_batch(2, SIZE, torch.Generator().manual_seed(5))
    assert none is None and teacher_st.shape == (2, 384, 8, 8) and torch.equal(batch_with, batch_without)
    with_cache = train_step(model, batch_with, cached, torch.Generator().manual_seed(1), "fp32", teacher_st)
    computed = train_step(model, batch_without, images, torch.Generator().manual_seed(1), "fp32")
    for name, value in computed.items():
        assert torch.allclose(with_cache[name], value, rtol=1e-4, atol=1e-6), name


def test_the_penalty_is_taken_on_crops_of_the_asked_size(model: EfficientAD, images) -> None:
    cropped = replace(images, penalty_crop=48)
    batch, _ = cropped.draw_batch(2, SIZE, torch.Generator().manual_seed(3))
    losses = train_step(model, batch, cropped, torch.Generator().manual_seed(7), "fp32")
    replay = torch.Generator().manual_seed(7)  # the step's draws: jitter first, then the penalty crops
    random_color_jitter(batch, replay)
    crops = random_penalty_crops(images.penalty_pool, 2, 48, replay)  # (2, 3, 48, 48)
    with torch.no_grad():
        expected = penalty_loss(model.student(normalise_unit_images(crops))[:, :384])
    assert torch.allclose(losses["penalty"].detach(), expected, rtol=1e-5)
    full = train_step(model, batch, images, torch.Generator().manual_seed(7), "fp32")
    assert not torch.allclose(full["penalty"], losses["penalty"])  # other crops: the setting is used


def test_recipes_are_presets_that_explicit_settings_override() -> None:
    paper = TrainSettings.from_recipe("paper")
    assert (paper.steps, paper.image_size, paper.learning_rate, paper.penalty_crop) == (
        70_000,
        256,
        1e-4,
        None,
    )
    fast = TrainSettings.from_recipe("fast", steps=7)
    assert fast.recipe == "fast" and fast.steps == 7
    assert all(getattr(fast, name) == value for name, value in RECIPES["fast"].items() if name != "steps")
    fast.check()
    with pytest.raises(UserError, match="--recipe"):
        TrainSettings.from_recipe("slow")
    with pytest.raises(UserError, match="--penalty-crop"):
        TrainSettings.from_recipe("fast", penalty_crop=256).check()  # larger than the image


def test_the_recipe_help_reads_the_presets(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    fast = RECIPES["fast"]
    assert f"{fast['steps']} steps at {fast['image_size']} px" in help_text
    assert "70000 steps at 256 px, lr 1e-4" in help_text
    assert "--recipe {fast,paper}" in help_text


def test_the_cli_trains_with_the_fast_recipe_unless_told_otherwise(tmp_path: Path, cookie_dir: Path, capsys):
    run_dir = tmp_path / "run"
    common = ["train", str(cookie_dir), "--out", str(run_dir), "--teacher", "random", "--device", "cpu"]
    tiny = ["--image-size", str(SIZE), "--penalty-crop", "48", "--penalty-dir", str(NATURAL)]
    assert main([*common, *tiny, "--steps", "3", "--stop-after", "1"]) == 0
    settings = load_saved_state(run_dir).settings(TrainSettings)
    assert settings.recipe == "fast" and settings.image_size == SIZE and settings.penalty_crop == 48
    assert settings.checkpoint_dtype == RECIPES["fast"]["checkpoint_dtype"]  # from the recipe
    assert main([*common, "--resume", "--recipe", "paper"]) == 2
    assert "--recipe paper (the run has fast)" in capsys.readouterr().err


def test_eval_every_records_a_learning_curve(tmp_path: Path, cookie_dir: Path) -> None:
    from tests.training.conftest import tiny_train_args
    from training.checkpoint import read_metadata
    from training.train import CURVE_FILE

    run_dir = tmp_path / "run"
    assert main(tiny_train_args(cookie_dir, run_dir, "--eval-every", "1", steps=3)) == 0
    curve = read_metadata(run_dir)["metrics"]["curve"]
    assert [point["step"] for point in curve] == [1, 2, 3]  # every step, the last one by `finish`
    assert [point["seconds"] for point in curve] == sorted(point["seconds"] for point in curve)
    for point in curve:
        assert 0.0 <= point["image_auroc"] <= 1.0 and 0.0 <= point["threshold_detection_rate"] <= 1.0
        assert point["defects_caught"] + point["good_flagged"] <= 10  # the 10 bundled test photos
    written = json.loads((run_dir / CURVE_FILE).read_text())
    assert written == curve  # the file grows during training: progress can be watched
    validation = read_metadata(run_dir)["validation_scores"]
    assert max(validation["values"].values()) == validation["max"]
    assert read_metadata(run_dir)["threshold"] == default_threshold(list(validation["values"].values()))
