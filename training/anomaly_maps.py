"""The unfused anomaly-map computation: the reference that the fused export graph must equal.

Inputs are ImageNet-normalised float images. Map statistics (teacher channel mean/std and the four map
quantiles) travel in the checkpoint as `MapStatistics`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.networks import IMAGENET_MEAN, IMAGENET_STD, TEACHER_CHANNELS

MAP_PADDING = 4  # px of zeros around the normalised map before upsampling (paper's reference code)


@dataclass
class MapStatistics:
    teacher_mean: torch.Tensor  # (384,)
    teacher_std: torch.Tensor  # (384,)
    q_st_a: torch.Tensor  # () 0.9 quantile of map_st on validation images
    q_st_b: torch.Tensor  # () 0.995 quantile of map_st
    q_ae_a: torch.Tensor  # () 0.9 quantile of map_ae
    q_ae_b: torch.Tensor  # () 0.995 quantile of map_ae

    TENSOR_NAMES = ("teacher_mean", "teacher_std", "q_st_a", "q_st_b", "q_ae_a", "q_ae_b")

    @classmethod
    def identity(cls, channels: int = TEACHER_CHANNELS) -> MapStatistics:
        """Statistics that leave features unscaled and maps at 0.1 * m (before any training data is seen)."""
        return cls(
            teacher_mean=torch.zeros(channels),
            teacher_std=torch.ones(channels),
            q_st_a=torch.tensor(0.0),
            q_st_b=torch.tensor(1.0),
            q_ae_a=torch.tensor(0.0),
            q_ae_b=torch.tensor(1.0),
        )

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.TENSOR_NAMES}


def imagenet_normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 RGB -> (N, 3, H, W) float32 ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=images_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images_uint8.device).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std


def raw_maps(
    teacher: nn.Module,
    student: nn.Module,
    autoencoder: nn.Module,
    stats: MapStatistics,
    images: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) normalised images -> map_st, map_ae, each (N, 1, h, w), not yet quantile-normalised."""
    mean = stats.teacher_mean.to(images.device).view(1, -1, 1, 1)
    std = stats.teacher_std.to(images.device).view(1, -1, 1, 1)
    teacher_features = (teacher(images) - mean) / std  # (N, 384, h, w)
    student_features = student(images)  # (N, 768, h, w)
    ae_features = autoencoder(images)  # (N, 384, h, w)
    channels = teacher_features.shape[1]
    map_st = ((teacher_features - student_features[:, :channels]) ** 2).mean(dim=1, keepdim=True)
    map_ae = ((ae_features - student_features[:, channels:]) ** 2).mean(dim=1, keepdim=True)
    return map_st, map_ae


def combine_maps(
    map_st: torch.Tensor, map_ae: torch.Tensor, stats: MapStatistics, image_size: tuple[int, int]
) -> torch.Tensor:
    """Quantile-normalise, average 0.5/0.5, zero-pad 4 px, upsample bilinearly -> (N, 1, H, W)."""
    q_st_a, q_st_b = stats.q_st_a.to(map_st.device), stats.q_st_b.to(map_st.device)
    q_ae_a, q_ae_b = stats.q_ae_a.to(map_ae.device), stats.q_ae_b.to(map_ae.device)
    map_st = 0.1 * (map_st - q_st_a) / (q_st_b - q_st_a)
    map_ae = 0.1 * (map_ae - q_ae_a) / (q_ae_b - q_ae_a)
    combined = 0.5 * map_st + 0.5 * map_ae  # (N, 1, h, w)
    combined = F.pad(combined, (MAP_PADDING,) * 4)  # (N, 1, h + 8, w + 8)
    return F.interpolate(combined, size=image_size, mode="bilinear", align_corners=False)  # (N, 1, H, W)


@torch.no_grad()
def anomaly_maps(
    teacher: nn.Module,
    student: nn.Module,
    autoencoder: nn.Module,
    stats: MapStatistics,
    images: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) normalised images -> (anomaly_map (N, 1, H, W), score (N,) = max of the map)."""
    map_st, map_ae = raw_maps(teacher, student, autoencoder, stats, images)
    combined = combine_maps(map_st, map_ae, stats, (images.shape[-2], images.shape[-1]))
    return combined, combined.flatten(1).amax(dim=1)
