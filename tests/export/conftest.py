"""Shared fixtures: random-weight checkpoints with statistics fitted on real cookie images, exported once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.checkpoint import ModelConfig, save_checkpoint
from training.images import load_image_tensor
from training.model import EfficientAD, MapStatistics, imagenet_normalise
from training.networks import build_networks

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "cookie"
PARITY_IMAGES = [
    SAMPLES / "test" / "good" / "test-normal-1.jpg",
    SAMPLES / "test" / "good" / "test-normal-10.jpg",
    SAMPLES / "test" / "anomaly" / "anomaly-10.jpg",
    SAMPLES / "test" / "anomaly" / "anomaly-11.jpg",
    SAMPLES / "test" / "anomaly" / "test-anomaly-1.jpg",
]
TRAIN_IMAGES = sorted((SAMPLES / "train" / "good").glob("*.jpg"))[:3]


@torch.no_grad()
def fitted_statistics(teacher, student, autoencoder, image_size: int) -> MapStatistics:
    """Teacher channel mean/std and map quantiles computed on real good images, as training does."""
    images = imagenet_normalise(torch.stack([load_image_tensor(p, image_size) for p in TRAIN_IMAGES]))
    features = teacher(images)  # (N, 384, h, w)
    mean = features.mean(dim=(0, 2, 3))
    std = features.std(dim=(0, 2, 3)) + 1e-6
    stats = MapStatistics(**{**MapStatistics.identity().as_dict(), "teacher_mean": mean, "teacher_std": std})
    model = EfficientAD(teacher, student, autoencoder, stats, image_size=image_size)
    map_st, map_ae = model.raw_maps(images)  # (N, 1, h, w) each
    return MapStatistics(
        teacher_mean=mean,
        teacher_std=std,
        q_st_a=torch.quantile(map_st.flatten(), 0.9),
        q_st_b=torch.quantile(map_st.flatten(), 0.995),
        q_ae_a=torch.quantile(map_ae.flatten(), 0.9),
        q_ae_b=torch.quantile(map_ae.flatten(), 0.995),
    )


def make_checkpoint(
    run_dir: Path, *, size: str = "small", image_size: int = 256, seed: int = 0, threshold: float | None = 0.1
) -> Path:
    """A random-weight checkpoint (teacher flagged random) with fitted statistics; returns the run dir."""
    torch.manual_seed(seed)
    teacher, student, autoencoder = build_networks(size, image_size)
    for network in (teacher, student, autoencoder):
        network.eval()
    stats = fitted_statistics(teacher, student, autoencoder, image_size)
    metadata = {"teacher": {"source": "random", "random": True}, "metrics": {"image_auroc": 0.5}}
    if threshold is not None:
        metadata["threshold"] = threshold
    save_checkpoint(
        run_dir,
        config=ModelConfig(size=size, image_size=image_size),
        teacher=teacher,
        student=student,
        autoencoder=autoencoder,
        stats=stats,
        metadata=metadata,
    )
    return run_dir


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PDN-S at 256 px."""
    return make_checkpoint(tmp_path_factory.mktemp("small") / "run")


@pytest.fixture(scope="session")
def small_model_dir(small_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The PDN-S checkpoint exported once (model.onnx + model.json) with five real parity images."""
    from export.exporter import export_model

    out = tmp_path_factory.mktemp("small_model") / "model"
    export_model(small_run, out, parity_images=PARITY_IMAGES)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PDN-S at 64 px: quick exports for CLI and failure tests."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "run", image_size=64, seed=1)
