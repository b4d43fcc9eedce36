"""Checkpoint save/load: an exact round trip, and a CheckpointError naming the problem for every bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.checkpoint import (
    METADATA_FILE,
    TENSORS_FILE,
    CheckpointError,
    ModelConfig,
    load_checkpoint,
    save_checkpoint,
)
from training.model import MapStatistics
from training.networks import build_networks

IMAGE_SIZE = 64


def _stats() -> MapStatistics:
    generator = torch.Generator().manual_seed(3)
    return MapStatistics(
        teacher_mean=torch.randn(384, generator=generator),
        teacher_std=torch.rand(384, generator=generator) + 0.5,
        q_st_a=torch.tensor(0.11),
        q_st_b=torch.tensor(0.52),
        q_ae_a=torch.tensor(0.07),
        q_ae_b=torch.tensor(0.31),
    )


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, tuple, MapStatistics]:
    torch.manual_seed(0)
    networks = build_networks("small", IMAGE_SIZE)
    stats = _stats()
    save_checkpoint(
        tmp_path,
        config=ModelConfig(size="small", image_size=IMAGE_SIZE),
        teacher=networks[0],
        student=networks[1],
        autoencoder=networks[2],
        stats=stats,
        metadata={"threshold": 0.25, "teacher": {"source": "random", "random": True}},
    )
    return tmp_path, networks, stats


def test_round_trip_loads_exactly_what_was_saved(saved) -> None:
    run_dir, networks, stats = saved
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.config == ModelConfig(size="small", image_size=IMAGE_SIZE)
    for original, loaded in zip(networks, checkpoint.networks(), strict=True):
        assert not loaded.training
        original_state, loaded_state = original.state_dict(), loaded.state_dict()
        assert original_state.keys() == loaded_state.keys()
        for name, value in original_state.items():
            assert torch.equal(value, loaded_state[name]), name
    for name, value in stats.as_dict().items():
        assert torch.equal(value, getattr(checkpoint.stats, name)), name
    assert checkpoint.threshold == 0.25
    assert checkpoint.metadata["teacher"]["random"] is True
    assert len(checkpoint.sha256) == 64


def test_loaded_networks_compute_the_same_maps(saved) -> None:
    from training.model import EfficientAD

    run_dir, networks, stats = saved
    expected = EfficientAD(*networks, stats, image_size=IMAGE_SIZE).eval()
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    checkpoint = load_checkpoint(run_dir / TENSORS_FILE)  # the .safetensors path works too
    with torch.no_grad():
        expected_map, expected_score = expected(images)
        got_map, got_score = EfficientAD.from_checkpoint(checkpoint)(images)
    assert torch.equal(expected_map, got_map)
    assert torch.equal(expected_score, got_score)


def test_corrupt_tensor_file_is_refused(saved) -> None:
    run_dir, _, _ = saved
    path = run_dir / TENSORS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as error:
        load_checkpoint(run_dir)
    assert str(path) in str(error.value)


def test_truncated_tensor_file_is_refused_even_without_a_recorded_hash(saved) -> None:
    run_dir, _, _ = saved
    path = run_dir / TENSORS_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(run_dir)
    document = json.loads((run_dir / METADATA_FILE).read_text())
    del document["tensors_sha256"]
    (run_dir / METADATA_FILE).write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="cannot read") as error:
        load_checkpoint(run_dir)
    assert str(path) in str(error.value)


def test_foreign_or_broken_json_is_refused(saved) -> None:
    run_dir, _, _ = saved
    metadata = run_dir / METADATA_FILE
    metadata.write_text(json.dumps({"model": "resnet50", "weights": "imagenet"}))
    with pytest.raises(CheckpointError, match="not an EfficientAD checkpoint") as error:
        load_checkpoint(run_dir)
    assert str(metadata) in str(error.value)
    metadata.write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(run_dir)


def test_wrong_shapes_are_named(saved) -> None:
    run_dir, _, _ = saved
    document = json.loads((run_dir / METADATA_FILE).read_text())
    document["model"]["size"] = "medium"  # the tensors are PDN-S
    (run_dir / METADATA_FILE).write_text(json.dumps(document))
    with pytest.raises(
        CheckpointError, match=r"tensor 'teacher\.layers\.\d+\.weight' (has shape|is missing)"
    ):
        load_checkpoint(run_dir)
    document["model"].update(size="small", image_size=128)  # autoencoder bottleneck kernel 4 instead of 2
    (run_dir / METADATA_FILE).write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=r"autoencoder\.encoder\.10\.weight' has shape"):
        load_checkpoint(run_dir)


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found") as error:
        load_checkpoint(tmp_path / "nowhere")
    assert "nowhere" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="metadata not found"):
        load_checkpoint(tmp_path / "empty")
