"""The fused module (uint8 input, folded teacher normalisation) computes what EfficientAD computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from export.fused import FusedEfficientAD, fold_channel_normalisation
from training.checkpoint import load_checkpoint
from training.images import load_image_tensor
from training.model import EfficientAD, imagenet_normalise

from .conftest import PARITY_IMAGES, make_checkpoint


def real_images(size: int, count: int = 3) -> torch.Tensor:
    return torch.stack([load_image_tensor(p, size) for p in PARITY_IMAGES[:count]])  # (N, 3, S, S) uint8


@pytest.mark.parametrize(("size", "image_size"), [("small", 256), ("medium", 64)])
def test_fused_equals_unfused_reference(tmp_path, small_run, size, image_size):
    run = (
        small_run if size == "small" else make_checkpoint(tmp_path / "run", size=size, image_size=image_size)
    )
    checkpoint = load_checkpoint(run)
    fused = FusedEfficientAD.from_checkpoint(checkpoint)
    images = real_images(image_size)
    with torch.no_grad():
        fused_map, fused_score = fused(images)
        reference_map, reference_score = EfficientAD.from_checkpoint(checkpoint)(imagenet_normalise(images))
    assert fused_map.shape == (3, 1, image_size, image_size) and fused_map.dtype == torch.float32
    assert fused_score.shape == (3,) and fused_score.dtype == torch.float32
    assert reference_map.abs().max() > 0.01  # non-trivial maps, so equality means something
    scale = float(reference_map.abs().max())
    assert torch.allclose(fused_map, reference_map, rtol=0, atol=1e-5 * max(1.0, scale))
    assert torch.allclose(fused_score, reference_score, rtol=0, atol=1e-5 * max(1.0, scale))
    assert torch.equal(fused_score, fused_map.flatten(1).amax(dim=1))


def test_constants_are_buffers_and_module_stays_in_eval(tiny_run):
    checkpoint = load_checkpoint(tiny_run)
    fused = FusedEfficientAD.from_checkpoint(checkpoint)
    buffers = dict(fused.named_buffers())
    for name in ("imagenet_mean", "imagenet_std", "teacher_mean", "teacher_std"):
        assert name in buffers
    for name in ("q_st_a", "q_st_b", "q_ae_a", "q_ae_b"):
        assert torch.equal(buffers[f"map_head.{name}"], getattr(checkpoint.stats, name))
    fused.train()  # no training branch: dropout stays off
    assert not any(module.training for module in fused.modules())
    images = real_images(64, 2)
    with torch.no_grad():
        first, second = fused(images), fused(images)
    assert torch.equal(first[0], second[0])
    # the checkpoint's own networks are not modified by building the fused module
    assert checkpoint.teacher.layers[-1].weight.data_ptr() != fused.teacher.layers[-1].weight.data_ptr()


def test_folded_teacher_normalisation_matches_explicit_normalisation():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3)
    mean, std = torch.randn(6), torch.rand(6) + 0.5
    folded = fold_channel_normalisation(conv, mean, std)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        expected = (conv(x) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        assert torch.allclose(folded(x), expected, atol=1e-5)
