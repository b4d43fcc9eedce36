"""Output shapes of PDN-S, PDN-M and the autoencoder at the paper's 256x256 input (and at the test size)."""

from __future__ import annotations

import pytest
import torch

from training.networks import PDN, Autoencoder, build_networks, pdn_output_size


@pytest.mark.parametrize("size", ["small", "medium"])
@torch.no_grad()
def test_networks_at_256_give_the_papers_56x56_grid(size: str) -> None:
    teacher, student, autoencoder = build_networks(size, 256)
    images = torch.randn(1, 3, 256, 256)
    assert teacher(images).shape == (1, 384, 56, 56)
    assert student(images).shape == (1, 768, 56, 56)
    assert autoencoder(images).shape == (1, 384, 56, 56)


@pytest.mark.parametrize("size", ["small", "medium"])
@torch.no_grad()
def test_padded_pdn_for_distillation_gives_64x64(size: str) -> None:
    teacher = PDN(size=size, padding=True)
    assert teacher(torch.randn(1, 3, 256, 256)).shape == (1, 384, 64, 64)
    assert pdn_output_size(256, padding=True) == 64


@torch.no_grad()
def test_autoencoder_matches_the_pdn_grid_at_small_inputs() -> None:
    for image_size in (64, 128):
        side = pdn_output_size(image_size)
        images = torch.randn(2, 3, image_size, image_size)
        assert PDN(size="small")(images).shape == (2, 384, side, side)
        assert Autoencoder(image_size=image_size)(images).shape == (2, 384, side, side)


def test_sizes_differ_in_capacity_and_bad_sizes_are_refused() -> None:
    small = sum(p.numel() for p in PDN(size="small").parameters())
    medium = sum(p.numel() for p in PDN(size="medium").parameters())
    assert medium > 2 * small
    with pytest.raises(ValueError, match="large"):
        PDN(size="large")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of 32"):
        Autoencoder(image_size=100)
