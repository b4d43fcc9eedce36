"""Augmentations in plain torch (no torchvision): colour jitter for the autoencoder, crops for penalty images,
and the optional geometric augmentation of the training images (`efficientad train --augment geometric`).

Every random draw comes from the `torch.Generator` passed in (on the CPU), so a run is reproducible from
its seed and resumable from the generator's saved state; the image arithmetic runs on the images' device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GEOMETRIC_MAX_ZOOM = 1.25  # --augment geometric: a window of 1/1.25 .. 1 of the image side, resized to S
JITTER_STRENGTH = 0.2  # factors uniform in [0.8, 1.2], as ColorJitter(brightness=0.2) etc.
PENALTY_GRAYSCALE_PROBABILITY = 0.3
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float RGB -> (N, 1, H, W) luma."""
    red, green, blue = images.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * red + GRAY_WEIGHTS[1] * green + GRAY_WEIGHTS[2] * blue).unsqueeze(1)


def random_color_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of brightness, contrast or saturation per image, factor uniform in [0.8, 1.2].

    `images`: (N, 3, H, W) float in [0, 1]. Each is torchvision's definition, a blend clamped to [0, 1]:
    brightness blends with black, contrast with the mean gray level, saturation with the grayscale image.
    The draws stay on the CPU and pick the arithmetic per image: nothing waits on the GPU.
    """
    count = images.shape[0]
    choices = torch.randint(
        0, 3, (count,), generator=generator
    ).tolist()  # 0 brightness, 1 contrast, 2 saturation
    factors = (1.0 + (torch.rand(count, generator=generator) * 2.0 - 1.0) * JITTER_STRENGTH).tolist()
    jittered = []
    for image, choice, factor in zip(images.split(1), choices, factors, strict=True):  # each (1, 3, H, W)
        if choice == 0:
            blended = factor * image
        elif choice == 1:
            blended = factor * image + (1.0 - factor) * grayscale(image).mean()
        else:
            blended = factor * image + (1.0 - factor) * grayscale(image)
        jittered.append(blended.clamp(0.0, 1.0))
    return torch.cat(jittered)  # (N, 3, H, W)


def random_penalty_crops(
    pool: torch.Tensor, count: int, size: int, generator: torch.Generator
) -> torch.Tensor:
    """Pick `count` penalty images, grayscale with p = 0.3, random crop -> (count, 3, size, size) in [0, 1].

    `pool`: (M, 3, 2 * size, 2 * size) uint8, the penalty images already resized to twice the input size.
    """
    side = pool.shape[-1]
    picks = torch.randint(0, pool.shape[0], (count,), generator=generator).tolist()
    tops = torch.randint(0, side - size + 1, (count,), generator=generator).tolist()
    lefts = torch.randint(0, side - size + 1, (count,), generator=generator).tolist()
    grays = (torch.rand(count, generator=generator) < PENALTY_GRAYSCALE_PROBABILITY).tolist()
    crops = []
    for pick, top, left, gray in zip(picks, tops, lefts, grays, strict=True):
        crop = pool[pick : pick + 1, :, top : top + size, left : left + size].float() / 255.0  # (1, 3, S, S)
        crops.append(grayscale(crop).expand(-1, 3, -1, -1) if gray else crop)
    return torch.cat(crops)  # (count, 3, size, size)


def random_geometric(pool: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random flips (left-right, up-down) and zoom of training images -> (B, 3, size, size) float in [0, 1].

    `pool`: (B, 3, 2 * size, 2 * size) uint8, the picked training images at twice the input size, so a
    zoomed window (side 2S / z, z uniform in [1, GEOMETRIC_MAX_ZOOM], anywhere in the image) is always
    downsampled (antialiased), never blown up. For objects with no up, down, left or right and photos
    taken from varying distance (handheld cameras); a fixed line camera keeps the paper's `none`.
    """
    count, side = pool.shape[0], pool.shape[-1]
    zooms = (1.0 + torch.rand(count, generator=generator) * (GEOMETRIC_MAX_ZOOM - 1.0)).tolist()
    offsets = torch.rand(count, 2, generator=generator).tolist()
    flips = (torch.rand(count, 2, generator=generator) < 0.5).tolist()
    out = []
    for image, zoom, (top_at, left_at), (flip_lr, flip_ud) in zip(
        pool.split(1), zooms, offsets, flips, strict=True
    ):
        window = max(size, round(side / zoom))
        top, left = round(top_at * (side - window)), round(left_at * (side - window))
        crop = image[:, :, top : top + window, left : left + window].float() / 255.0  # (1, 3, w, w)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if flip_lr:
            crop = crop.flip(-1)
        if flip_ud:
            crop = crop.flip(-2)
        out.append(crop.clamp(0.0, 1.0))
    return torch.cat(out)  # (B, 3, size, size)
