"""Distillation on the bundled natural images with EfficientNet-Lite0: it learns, is seeded, and writes a
teacher file that loads into a working PDN; teacher files fail loudly when missing, truncated or foreign."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from efficientad.errors import UserError
from training.anomaly_maps import imagenet_normalise
from training.backbones import build_backbone
from training.checkpoint import CheckpointError
from training.distill import DistillationImages, distill_teacher, feature_statistics
from training.images import DataError, list_images
from training.networks import PDN, pdn_output_size
from training.teacher_file import load_teacher, save_teacher

NATURAL = Path(__file__).resolve().parents[2] / "samples" / "natural"
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    returned = distill_teacher(NATURAL, out, steps=20, batch_size=4, image_size=IMAGE_SIZE, device="cpu")
    assert returned == out
    return out


def distillation_error(teacher: PDN) -> float:
    """MSE between the padded PDN and the standardised backbone features on all 8 images (no augmentation)."""
    backbone = build_backbone("efficientnet-lite0", image_size=IMAGE_SIZE)
    images = DistillationImages(
        list_images(NATURAL), image_size=IMAGE_SIZE, backbone_size=backbone.input_size, augment=False
    )
    loader = DataLoader(images, batch_size=8)
    mean, std = feature_statistics(backbone, loader, torch.device("cpu"), len(images))
    pdn_images, backbone_images = next(iter(loader))
    with torch.no_grad():
        targets = (backbone(backbone_images.float() / 255) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return F.mse_loss(teacher(imagenet_normalise(pdn_images)), targets).item()


def padded_copy(teacher: PDN) -> PDN:
    padded = PDN(size=teacher.size, padding=True)
    padded.load_state_dict(teacher.state_dict())
    return padded.eval()


def test_distillation_reduces_the_error_to_the_backbone_features(distilled: Path) -> None:
    teacher, metadata = load_teacher(distilled)
    torch.manual_seed(0)
    untrained = PDN(size="small", padding=True).eval()  # a fresh initialisation
    before, after = distillation_error(untrained), distillation_error(padded_copy(teacher))
    assert after < 0.95 * before, (before, after)
    assert float(metadata["final_loss"]) < float(metadata["initial_loss"])


def test_teacher_file_loads_into_an_unpadded_pdn(distilled: Path) -> None:
    teacher, metadata = load_teacher(distilled)
    assert not teacher.padding and not teacher.training
    with torch.no_grad():
        features = teacher(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert features.shape == (1, 384, 8, 8) == (1, 384, pdn_output_size(64), pdn_output_size(64))
    assert metadata["format"] == "efficientad-teacher"
    assert metadata["size"] == "small"
    assert metadata["backbone"] == "efficientnet-lite0"
    assert metadata["backbone_weights"] == "efficientnet-lite0-57934424.pth"
    assert (metadata["steps"], metadata["batch_size"], metadata["image_size"]) == ("20", "4", "64")
    assert metadata["num_images"] == "8"
    assert len(metadata["dataset_fingerprint"]) == 64
    assert metadata["dataset_fingerprint_covers"] == "names+contents"
    assert '"torch"' in metadata["versions"]


def test_distillation_is_seeded(tmp_path: Path) -> None:
    settings = dict(steps=2, batch_size=2, image_size=32, device="cpu")
    first = distill_teacher(NATURAL, tmp_path / "a.safetensors", seed=3, **settings)
    second = distill_teacher(NATURAL, tmp_path / "b.safetensors", seed=3, **settings)
    # the process-wide random state moved on between the runs: equal weights mean the seed set it all
    assert torch.equal(load_teacher(first)[0].layers[0].weight, load_teacher(second)[0].layers[0].weight)


def test_distill_rejects_bad_settings(tmp_path: Path) -> None:
    out = tmp_path / "teacher.safetensors"
    with pytest.raises(UserError, match="unknown backbone"):
        distill_teacher(NATURAL, out, backbone="vgg16", steps=1)
    with pytest.raises(UserError, match="--steps"):
        distill_teacher(NATURAL, out, steps=0)
    with pytest.raises(DataError, match="image folder not found"):
        distill_teacher(tmp_path / "missing", out, steps=1)
    assert not out.exists()


def test_teacher_file_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match=r"teacher weights not found: .*missing\.safetensors"):
        load_teacher(missing)

    good = tmp_path / "good.safetensors"
    save_teacher(good, PDN(size="medium"), {"backbone": "test", "steps": 3})  # type: ignore[dict-item]
    teacher, metadata = load_teacher(good)
    assert teacher.size == "medium" and metadata["steps"] == "3"

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(
        CheckpointError, match=r"truncated\.safetensors .*truncated, corrupt or not a safetensors"
    ):
        load_teacher(truncated)

    pickled = tmp_path / "pickled.safetensors"
    torch.save(PDN().state_dict(), pickled)
    with pytest.raises(CheckpointError, match=r"pickled\.safetensors"):
        load_teacher(pickled)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"teacher.layers.0.weight": torch.zeros(1)}, str(foreign), metadata={"format": "other"})
    with pytest.raises(CheckpointError, match="not an EfficientAD teacher file"):
        load_teacher(foreign)

    wrong_shape = tmp_path / "wrong_shape.safetensors"
    tensors = {f"teacher.{name}": value for name, value in PDN(size="small").state_dict().items()}
    save_file(tensors, str(wrong_shape), metadata={"format": "efficientad-teacher", "size": "medium"})
    with pytest.raises(
        CheckpointError, match=r"wrong_shape\.safetensors: tensor 'teacher\.layers\.0\.weight' has shape"
    ):
        load_teacher(wrong_shape)
