"""Fixtures for the deployment tests: the repository root and a small exported model dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docker.helpers import REPO

MODEL_SIZE_PX = 64


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def exported_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model dir exported from a random-init checkpoint at 64 px (threshold 0.1): real graph, fast."""
    import torch

    from export.exporter import export_model
    from training.anomaly_maps import MapStatistics
    from training.checkpoint import ModelConfig, save_checkpoint
    from training.networks import build_networks

    root = tmp_path_factory.mktemp("deploy-model")
    torch.manual_seed(0)
    teacher, student, autoencoder = build_networks("small", MODEL_SIZE_PX)
    save_checkpoint(
        root / "run",
        config=ModelConfig(size="small", image_size=MODEL_SIZE_PX),
        teacher=teacher,
        student=student,
        autoencoder=autoencoder,
        stats=MapStatistics.identity(),
        metadata={"threshold": 0.1, "teacher": {"source": "random", "random": True}},
    )
    info = export_model(root / "run", root / "models" / "cookie")
    return info.path
