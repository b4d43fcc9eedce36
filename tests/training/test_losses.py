"""The training losses, the size-unlimited quantile, and the augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.augment import grayscale, random_color_jitter, random_penalty_crops
from training.losses import (
    autoencoder_loss,
    hard_feature_loss,
    penalty_loss,
    quantile,
    student_autoencoder_loss,
)


@pytest.mark.parametrize("method", ["select", "sort"])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.995, 0.999, 1.0])
def test_quantile_equals_torch_quantile(q: float, method: str) -> None:
    values = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(quantile(values, q, method=method), torch.quantile(values.flatten(), q))


def test_quantile_over_more_than_16m_elements() -> None:
    count = (1 << 24) + 4097  # torch.quantile refuses anything above 2**24 elements
    values = torch.randperm(count, generator=torch.Generator().manual_seed(0)).double()
    expected = 0.999 * (count - 1)  # the values are 0..count-1, so the quantile is its position
    assert quantile(values, 0.999).item() == pytest.approx(expected, abs=0.01)
    assert quantile(values, 0.5).item() == pytest.approx(0.5 * (count - 1), abs=0.01)
    assert quantile(values, 0.999, method="sort").item() == pytest.approx(expected, abs=0.01)  # the GPU path


def test_hard_loss_keeps_only_distances_at_or_above_the_0999_quantile() -> None:
    # 2000 squared distances: 1995 of 1.0 and 5 of 100.0. The 0.999 quantile (linear, position 1997.001)
    # lies among the five large ones, so exactly those survive and the loss is 100, not the mean 1.2475.
    teacher = torch.zeros(1, 20, 10, 10)
    student_values = torch.ones(2000)
    hard = torch.tensor([17, 404, 999, 1500, 1999])
    student_values[hard] = 10.0
    student = student_values.view(1, 20, 10, 10).clone().requires_grad_(True)
    loss = hard_feature_loss(teacher, student)
    assert loss.item() == pytest.approx(100.0)
    loss.backward()
    gradient = student.grad.flatten()
    assert torch.equal(torch.nonzero(gradient).flatten(), hard)  # only the kept distances get a gradient
    assert torch.allclose(gradient[hard], torch.full((5,), 2 * 10.0 / 5))


def test_hard_loss_with_distinct_distances_keeps_the_largest() -> None:
    distances = torch.arange(1000, dtype=torch.float32)  # quantile 998.001 -> only 999 survives
    student = distances.sqrt().view(1, 10, 10, 10)
    assert hard_feature_loss(torch.zeros_like(student), student).item() == pytest.approx(999.0)


def test_penalty_and_autoencoder_losses() -> None:
    student_penalty = torch.full((2, 384, 3, 3), 0.5)
    assert penalty_loss(student_penalty).item() == pytest.approx(0.25)
    teacher = torch.zeros(1, 384, 4, 4)
    autoencoder_output = torch.full((1, 384, 4, 4), 2.0, requires_grad=True)
    assert autoencoder_loss(teacher, autoencoder_output).item() == pytest.approx(4.0)
    student_ae = torch.full((1, 384, 4, 4), 1.0, requires_grad=True)
    loss = student_autoencoder_loss(autoencoder_output, student_ae)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert autoencoder_output.grad.abs().sum() > 0 and student_ae.grad.abs().sum() > 0  # both learn


# ----------------------------------------------------------------------------- augmentations


def _blend_references(images: torch.Tensor) -> list[torch.Tensor]:
    """What torchvision blends with: black (brightness), mean gray (contrast), the gray image (saturation)."""
    gray = grayscale(images)
    return [torch.zeros_like(gray), gray.mean(dim=(1, 2, 3), keepdim=True).expand_as(gray), gray]


def test_color_jitter_applies_exactly_one_op_with_a_factor_in_range() -> None:
    generator = torch.Generator().manual_seed(0)
    images = 0.3 + 0.4 * torch.rand(60, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # no clamping
    jittered = random_color_jitter(images, generator)
    assert jittered.shape == images.shape and jittered.min() >= 0 and jittered.max() <= 1
    used = set()
    for index in range(images.shape[0]):
        x, y = images[index].double(), jittered[index].double()
        fits = []
        for op, reference in enumerate(_blend_references(images[index : index + 1])):
            r = reference[0].double()
            factor = ((y - r) * (x - r)).sum() / ((x - r) ** 2).sum()  # least squares of y = f x + (1 - f) r
            residual = (y - (factor * x + (1 - factor) * r)).abs().max()
            if residual < 1e-5 and 0.8 - 1e-6 <= factor <= 1.2 + 1e-6:
                fits.append(op)
        assert fits, f"image {index} is not one jitter op with a factor in [0.8, 1.2]"
        used.update(fits)
    assert used == {0, 1, 2}  # all three ops occur
    assert not torch.allclose(jittered, images)


def test_color_jitter_is_reproducible_from_the_generator() -> None:
    images = torch.rand(4, 3, 8, 8)
    first = random_color_jitter(images, torch.Generator().manual_seed(5))
    assert torch.equal(first, random_color_jitter(images, torch.Generator().manual_seed(5)))


def test_penalty_crops_are_windows_of_the_pool_some_gray() -> None:
    size = 8
    ys, xs = np.mgrid[0 : 2 * size, 0 : 2 * size]
    coded = torch.from_numpy((ys * 16 + xs).astype(np.uint8))  # each pixel's value encodes its position
    pool = torch.stack([coded.expand(3, -1, -1), 255 - coded.expand(3, -1, -1)])  # (2, 3, 16, 16)
    pool[:, 1] = pool[:, 1] // 2  # make channels differ so grayscale is visible
    crops = random_penalty_crops(pool, 300, size, torch.Generator().manual_seed(0))
    assert crops.shape == (300, 3, size, size) and crops.min() >= 0 and crops.max() <= 1
    gray = (crops[:, 0] == crops[:, 1]).flatten(1).all(dim=1) & (crops[:, 1] == crops[:, 2]).flatten(1).all(
        dim=1
    )
    assert 0.2 < gray.float().mean().item() < 0.4  # p = 0.3
    for crop in crops[~gray][:20]:
        red = (crop[0] * 255).round().to(torch.uint8)
        found = False
        for image in pool:
            for top in range(size + 1):
                for left in range(size + 1):
                    if torch.equal(image[0, top : top + size, left : left + size], red):
                        found = True
        assert found, "a crop is not a window of a pool image"
