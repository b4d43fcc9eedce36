"""Training on the bundled real images: the checkpoint, resume, run-folder rules, teachers, statistics."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from efficientad.cli import main
from efficientad.errors import UserError
from efficientad.scores import DEFAULT_THRESHOLD_RULE
from tests.training.conftest import TINY_IMAGE_SIZE, tiny_train_args
from training.checkpoint import METADATA_FILE, TENSORS_FILE, file_sha256, load_checkpoint
from training.data import load_images, scan_category
from training.model import EfficientAD, imagenet_normalise
from training.networks import PDN, build_networks
from training.statistics import fit_map_quantiles, teacher_channel_stats
from training.train import STATE_FILE, TrainSettings, learning_rate_at, load_saved_state, train


def _metadata(run_dir: Path) -> dict:
    return json.loads((run_dir / METADATA_FILE).read_text())


def test_cli_run_on_cookie_writes_a_self_describing_checkpoint(tiny_run: Path, cookie_dir: Path) -> None:
    document = _metadata(tiny_run)
    assert document["model"] == {
        "size": "small",
        "image_size": 64,
        "teacher_channels": 384,
        "student_channels": 768,
    }
    assert document["threshold_rule"] == DEFAULT_THRESHOLD_RULE
    # one validation image: the 0.9 quantile of its score is the score; the rule adds one map unit
    assert document["threshold"] == pytest.approx(document["validation_scores"]["max"] + 0.1)
    assert document["teacher"]["source"] == "random" and document["teacher"]["random"] is True
    assert "tests and timing only" in document["teacher"]["note"]
    training = document["training"]
    assert training["steps"] == 3 and training["steps_completed"] == 3 and training["image_size"] == 64
    assert set(training["final_losses"]) == {"total", "hard", "penalty", "ae", "stae"}
    assert all(np.isfinite(value) for value in training["final_losses"].values())
    assert training["penalty"] == {"dir": str(cookie_dir.parent / "natural"), "images": 8, "available": 8}
    data = document["data"]
    assert data["train_images"] == 9 and data["validation_fraction"] == 0.1 and data["seed"] == 0
    assert len(data["validation_images"]) == 1 and data["validation_images"][0].startswith("train/good/")
    assert len(data["fingerprint"]) == 64
    overall = document["metrics"]["overall"]
    assert overall["images"] == 10 and overall["anomalous_images"] == 6 and overall["images_with_masks"] == 5
    for name in ("image_auroc", "pixel_auroc", "au_pro"):
        assert 0.0 <= overall[name] <= 1.0
    assert set(document["metrics"]["per_defect"]) == {"anomaly"}
    assert not (tiny_run / STATE_FILE).exists()


def test_trained_statistics_are_consistent_with_the_validation_image(
    tiny_run: Path, cookie_dir: Path
) -> None:
    checkpoint = load_checkpoint(tiny_run)
    stats = checkpoint.stats
    assert float(stats.q_st_a) < float(stats.q_st_b) and float(stats.q_ae_a) < float(stats.q_ae_b)
    validation = load_images(
        [cookie_dir / checkpoint.metadata["data"]["validation_images"][0]], TINY_IMAGE_SIZE
    )
    with torch.no_grad():
        map_st, map_ae = EfficientAD.from_checkpoint(checkpoint).raw_maps(imagenet_normalise(validation))
        assert float(stats.q_st_b) == pytest.approx(np.quantile(map_st.double().numpy(), 0.995), rel=1e-4)
        assert float(stats.q_ae_a) == pytest.approx(np.quantile(map_ae.double().numpy(), 0.9), rel=1e-4)


def test_resumed_run_repeats_the_uninterrupted_one(tmp_path: Path, cookie_dir: Path, capsys) -> None:
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    assert main(tiny_train_args(cookie_dir, interrupted, "--stop-after", "2", steps=4)) == 0
    assert "--resume" in capsys.readouterr().out
    assert not (interrupted / METADATA_FILE).exists()
    assert sorted(path.name for path in interrupted.iterdir()) == [STATE_FILE]  # one file
    state = load_saved_state(interrupted)
    assert state.step == 2 and state.document["settings"]["steps"] == 4
    assert any(key.startswith("optimizer.") for key in state.tensors)

    assert main(["train", str(cookie_dir), "--out", str(interrupted)]) == 2  # neither --resume nor --force
    assert "unfinished run" in capsys.readouterr().err
    assert main(["train", str(cookie_dir), "--out", str(interrupted), "--resume", "--batch-size", "2"]) == 2
    assert "--batch-size 2 (the run has 1)" in capsys.readouterr().err
    assert main(["train", str(cookie_dir), "--out", str(interrupted), "--resume", "--steps", "1"]) == 2
    assert "below the step the run reached (2)" in capsys.readouterr().err

    assert main(["train", str(cookie_dir), "--out", str(interrupted), "--resume", "--device", "cpu"]) == 0
    assert _metadata(interrupted)["training"]["steps_completed"] == 4
    assert not (interrupted / STATE_FILE).exists()

    assert main(tiny_train_args(cookie_dir, straight, steps=4)) == 0
    resumed, reference = load_checkpoint(interrupted), load_checkpoint(straight)
    for name in ("student", "autoencoder", "teacher"):
        resumed_state, reference_state = (
            getattr(resumed, name).state_dict(),
            getattr(reference, name).state_dict(),
        )
        for key, value in reference_state.items():
            assert torch.equal(resumed_state[key], value), f"{name}.{key}"
    assert resumed.threshold == reference.threshold


def test_periodic_states_are_saved(tmp_path: Path, cookie_dir: Path, natural_dir: Path, caplog) -> None:
    settings = TrainSettings(
        steps=5,
        image_size=TINY_IMAGE_SIZE,
        teacher="random",
        device="cpu",
        save_every=2,
        penalty_dir=str(natural_dir),
    )
    with caplog.at_level(logging.INFO, logger="training.run_state"):
        train(cookie_dir, tmp_path / "run", settings, stop_after_step=3)
    saved_at = [record.args[0] for record in caplog.records if record.msg.startswith("saved the state")]
    assert saved_at == [2, 3]


def test_finished_run_needs_force_and_force_replaces_it(
    tmp_path: Path, tiny_run: Path, cookie_copy: Path, capsys
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    assert main(tiny_train_args(cookie_copy, run_dir, steps=1)) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(tiny_train_args(cookie_copy, run_dir, "--resume", steps=1)) == 2
    assert "nothing to resume" in capsys.readouterr().err

    shutil.rmtree(cookie_copy / "test")  # no test set: train still works, without metrics
    shutil.rmtree(cookie_copy / "ground_truth")
    old_hash = file_sha256(run_dir / TENSORS_FILE)
    assert main(tiny_train_args(cookie_copy, run_dir, "--force", "--seed", "7", steps=1)) == 0
    document = _metadata(run_dir)
    assert document["training"]["steps_completed"] == 1 and document["data"]["seed"] == 7
    assert document["metrics"] is None
    assert file_sha256(run_dir / TENSORS_FILE) != old_hash


def test_missing_default_teacher_explains_what_to_do(
    tmp_path: Path, cookie_dir: Path, monkeypatch, capsys
) -> None:
    import training.teacher_file

    monkeypatch.setattr(training.teacher_file, "DEFAULT_TEACHER_PATH", tmp_path / "absent.safetensors")
    code = main(
        ["train", str(cookie_dir), "--out", str(tmp_path / "run"), "--image-size", "64", "--steps", "1"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "efficientad distill" in err and "--teacher random" in err and "absent.safetensors" in err


def test_teacher_file_is_used_and_stays_frozen(tmp_path: Path, cookie_dir: Path, capsys) -> None:
    from training.teacher_file import save_teacher

    torch.manual_seed(11)
    teacher_path = tmp_path / "teacher.safetensors"
    teacher = PDN(size="small")
    save_teacher(teacher_path, teacher, {"backbone": "test"})
    run_dir = tmp_path / "run"
    args = tiny_train_args(cookie_dir, run_dir, steps=2)
    args[args.index("random")] = str(teacher_path)
    assert main(args) == 0
    checkpoint = load_checkpoint(run_dir)
    for key, value in teacher.state_dict().items():
        assert torch.equal(checkpoint.teacher.state_dict()[key], value), key
    record = checkpoint.metadata["teacher"]
    assert record["random"] is False and record["sha256"] == file_sha256(teacher_path)
    assert record["source"] == str(teacher_path)

    medium_path = tmp_path / "medium.safetensors"
    save_teacher(medium_path, PDN(size="medium"), {})
    args[args.index(str(teacher_path))] = str(medium_path)
    args[args.index(str(run_dir))] = str(tmp_path / "other")
    assert main(args) == 2
    assert "PDN-medium but --size is small" in capsys.readouterr().err


def test_settings_are_checked() -> None:
    with pytest.raises(UserError, match="multiple of 32"):
        TrainSettings(image_size=100).check()
    with pytest.raises(UserError, match="--steps"):
        TrainSettings(steps=0).check()


def test_learning_rate_drops_tenfold_at_95_percent() -> None:
    settings = TrainSettings(steps=100, learning_rate=1e-4)
    assert learning_rate_at(0, settings) == 1e-4
    assert learning_rate_at(94, settings) == 1e-4
    assert learning_rate_at(95, settings) == pytest.approx(1e-5)
    assert learning_rate_at(99, settings) == pytest.approx(1e-5)


# ----------------------------------------------------------------------------- statistics


def test_teacher_statistics_streamed_equal_the_stacked_ones(cookie_dir: Path) -> None:
    torch.manual_seed(0)
    teacher = PDN(size="small").eval()
    images = load_images(scan_category(cookie_dir).train_images[:7], TINY_IMAGE_SIZE)
    mean, std = teacher_channel_stats(teacher, images, torch.device("cpu"), batch_size=3)  # 3 + 3 + 1
    with torch.no_grad():
        features = teacher(imagenet_normalise(images)).double()  # (7, 384, h, w)
    values = features.transpose(0, 1).flatten(1)
    assert torch.allclose(mean.double(), values.mean(dim=1), atol=1e-5)
    assert torch.allclose(std.double(), values.std(dim=1, unbiased=False), rtol=1e-4)


def test_map_quantiles_cover_all_validation_pixels(cookie_dir: Path) -> None:
    torch.manual_seed(0)
    model = EfficientAD(*build_networks("small", TINY_IMAGE_SIZE), image_size=TINY_IMAGE_SIZE).eval()
    images = load_images(scan_category(cookie_dir).train_images[:5], TINY_IMAGE_SIZE)
    stats = fit_map_quantiles(model, images, torch.device("cpu"), batch_size=2)
    assert torch.equal(model.map_head.q_st_b, stats.q_st_b)  # the model's buffers hold them
    with torch.no_grad():
        map_st, map_ae = model.raw_maps(imagenet_normalise(images))
    all_st, all_ae = map_st.detach().double().numpy(), map_ae.detach().double().numpy()
    assert float(stats.q_st_a) == pytest.approx(np.quantile(all_st, 0.9), rel=1e-5)
    assert float(stats.q_st_b) == pytest.approx(np.quantile(all_st, 0.995), rel=1e-5)
    assert float(stats.q_ae_a) == pytest.approx(np.quantile(all_ae, 0.9), rel=1e-5)
    assert float(stats.q_ae_b) == pytest.approx(np.quantile(all_ae, 0.995), rel=1e-5)
