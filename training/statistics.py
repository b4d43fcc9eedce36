"""Statistics a trained model carries: teacher channel mean/std, map quantiles, the default threshold.

- Teacher channel mean/std: over every position of the teacher's output on the training images,
  accumulated batch by batch in float64 (Chan's parallel update), never by stacking all features.
- Map quantiles q_a = 0.9 and q_b = 0.995 of the raw map_st and map_ae over all pixels of the
  validation images (numpy float64: no 16M-element limit).
- Default threshold: the largest final score over the validation images (`THRESHOLD_RULE`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.anomaly_maps import MapStatistics, anomaly_maps, imagenet_normalise, raw_maps

logger = logging.getLogger(__name__)

Q_A = 0.9
Q_B = 0.995
MIN_STD = 1e-6
THRESHOLD_RULE = (
    "max of the final anomaly scores of the validation images (good images held out of train/good)"
)


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
def map_quantiles(
    teacher: nn.Module,
    student: nn.Module,
    autoencoder: nn.Module,
    teacher_mean: torch.Tensor,
    teacher_std: torch.Tensor,
    validation_images: torch.Tensor,
    device: torch.device,
    *,
    batch_size: int = 16,
) -> MapStatistics:
    """Statistics with the 0.9 and 0.995 quantiles of the raw maps over all validation pixels."""
    stats = MapStatistics.identity(teacher_mean.shape[0])
    stats.teacher_mean, stats.teacher_std = teacher_mean, teacher_std
    maps_st, maps_ae = [], []
    for batch in _batches(validation_images, batch_size, "map quantiles"):
        map_st, map_ae = raw_maps(teacher, student, autoencoder, stats, imagenet_normalise(batch.to(device)))
        maps_st.append(map_st.double().cpu().numpy().ravel())  # N*h*w values
        maps_ae.append(map_ae.double().cpu().numpy().ravel())
    all_st, all_ae = np.concatenate(maps_st), np.concatenate(maps_ae)
    stats.q_st_a, stats.q_st_b = (torch.tensor(float(v)) for v in np.quantile(all_st, [Q_A, Q_B]))
    stats.q_ae_a, stats.q_ae_b = (torch.tensor(float(v)) for v in np.quantile(all_ae, [Q_A, Q_B]))
    for name in ("st", "ae"):
        low, high = getattr(stats, f"q_{name}_a"), getattr(stats, f"q_{name}_b")
        if float(high) - float(low) < MIN_STD:
            logger.warning(
                "map_%s quantiles are degenerate (q_a=%g, q_b=%g): the validation maps are constant",
                name,
                float(low),
                float(high),
            )
            setattr(stats, f"q_{name}_b", low + MIN_STD)
    return stats


@torch.no_grad()
def image_scores(
    teacher: nn.Module,
    student: nn.Module,
    autoencoder: nn.Module,
    stats: MapStatistics,
    images: torch.Tensor,
    device: torch.device,
    *,
    batch_size: int = 16,
) -> np.ndarray:
    """(N, 3, S, S) uint8 -> (N,) final anomaly scores (max of the combined map)."""
    scores = []
    for batch in _batches(images, batch_size, "scoring"):
        _, score = anomaly_maps(teacher, student, autoencoder, stats, imagenet_normalise(batch.to(device)))
        scores.append(score.float().cpu().numpy())
    return np.concatenate(scores)


def default_threshold(validation_scores: np.ndarray) -> float:
    """The decision threshold by `THRESHOLD_RULE`: no held-out good image is flagged."""
    return float(np.max(validation_scores))
