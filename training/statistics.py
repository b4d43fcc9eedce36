"""Statistics a trained model carries: teacher channel mean/std, map quantiles, the default threshold.

- Teacher channel mean/std: over every position of the teacher's output on the training images,
  accumulated batch by batch in float64 (Chan's parallel update), never by stacking all features.
- Map quantiles q_a = 0.9 and q_b = 0.995 of the raw map_st and map_ae over all pixels of the
  validation images (numpy float64: no 16M-element limit).
- The default threshold's rule is the core's (`efficientad.scores.default_threshold`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.model import EfficientAD, MapStatistics, imagenet_normalise

logger = logging.getLogger(__name__)

Q_A = 0.9
Q_B = 0.995
MIN_STD = 1e-6


def _batches(images: torch.Tensor, batch_size: int, desc: str):
    for start in tqdm(
        range(0, images.shape[0], batch_size), desc=desc, unit="batch", leave=False, disable=None
    ):
        yield images[start : start + batch_size]


@torch.no_grad()
def teacher_channel_stats(
    teacher: nn.Module, images: torch.Tensor, device: torch.device, *, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) uint8 training images -> per-channel (mean (C,), std (C,)) of the teacher's output."""
    count = 0
    mean: torch.Tensor | None = None
    sum_sq_dev: torch.Tensor | None = None  # sum of squared deviations from the mean, per channel
    for batch in _batches(images, batch_size, "teacher statistics"):
        features = teacher(imagenet_normalise(batch.to(device))).double()  # (B, C, h, w)
        values = features.transpose(0, 1).flatten(1)  # (C, B*h*w)
        batch_count = values.shape[1]
        batch_mean = values.mean(dim=1)
        batch_sum_sq_dev = ((values - batch_mean[:, None]) ** 2).sum(dim=1)
        if mean is None or sum_sq_dev is None:
            mean, sum_sq_dev = batch_mean, batch_sum_sq_dev
        else:
            delta = batch_mean - mean
            total = count + batch_count
            mean = mean + delta * (batch_count / total)
            sum_sq_dev = sum_sq_dev + batch_sum_sq_dev + delta**2 * (count * batch_count / total)
        count += batch_count
    if mean is None or sum_sq_dev is None:
        raise ValueError("teacher statistics need at least one image")
    std = (sum_sq_dev / count).sqrt()
    constant = int((std < MIN_STD).sum())
    if constant:
        logger.warning(
            "%d teacher channels are constant on the training images; their std is set to %g",
            constant,
            MIN_STD,
        )
    return mean.float().cpu(), std.clamp_min(MIN_STD).float().cpu()


@torch.no_grad()
def fit_map_quantiles(
    model: EfficientAD, validation_images: torch.Tensor, device: torch.device, *, batch_size: int = 16
) -> MapStatistics:
    """Set the model's 0.9 and 0.995 quantiles of the raw maps over all validation pixels; returns all its
    statistics. The teacher channel statistics must already be in the model."""
    maps_st, maps_ae = [], []
    for batch in _batches(validation_images, batch_size, "map quantiles"):
        map_st, map_ae = model.raw_maps(imagenet_normalise(batch.to(device)))  # (B, 1, h, w) each
        maps_st.append(map_st.double().cpu().numpy().ravel())  # B*h*w values
        maps_ae.append(map_ae.double().cpu().numpy().ravel())
    stats = model.stats
    for name, values in (("st", np.concatenate(maps_st)), ("ae", np.concatenate(maps_ae))):
        low, high = (float(v) for v in np.quantile(values, [Q_A, Q_B]))
        if high - low < MIN_STD:
            logger.warning(
                "map_%s quantiles are degenerate (q_a=%g, q_b=%g): the validation maps are constant",
                name, low, high,
            )  # fmt: skip
            high = low + MIN_STD
        setattr(stats, f"q_{name}_a", torch.tensor(low))
        setattr(stats, f"q_{name}_b", torch.tensor(high))
    model.set_statistics(stats)
    return model.stats


@torch.no_grad()
def image_scores(
    model: EfficientAD, images: torch.Tensor, device: torch.device, *, batch_size: int = 16
) -> np.ndarray:
    """(N, 3, S, S) uint8 -> (N,) final anomaly scores (max of the combined map)."""
    scores = []
    for batch in _batches(images, batch_size, "scoring"):
        _, score = model(imagenet_normalise(batch.to(device)))  # (B,)
        scores.append(score.float().cpu().numpy())
    return np.concatenate(scores)
