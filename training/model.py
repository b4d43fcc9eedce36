"""The one EfficientAD module: teacher, student, autoencoder and the statistics that turn their outputs into
an anomaly map; trained (its networks), evaluated and exported (by `export.fused`) as this one thing.

    images (N, 3, H, W), ImageNet-normalised
    T = (teacher(images) - teacher_mean) / teacher_std             # (N, 384, h, w)
    S = student(images)                                            # (N, 768, h, w)
    A = autoencoder(images)                                        # (N, 384, h, w)
    map_st = mean_c (T - S[:, :384])^2, map_ae = mean_c (A - S[:, 384:])^2      # (N, 1, h, w) each
    each quantile-normalised 0.1 (m - q_a) / (q_b - q_a), averaged 0.5 / 0.5
    zero-padded by 4 px, bilinearly upsampled (align_corners=False) to H x W   # (N, 1, H, W)
    score = max of the map                                         # (N,)

`EfficientAD.forward` returns (map, score) exactly as the served graph computes it (in train mode too: no
training branch). The statistics (teacher channel mean/std, the four map quantiles) are buffers, so they
travel with the module into the checkpoint and the exported graph; `MapStatistics` is their plain form.
All post-network arithmetic lives in the `map_head` submodule: the exported graph names its nodes
`/map_head/...`, and the TensorRT build keeps exactly those layers in FP32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from training.networks import IMAGENET_MEAN, IMAGENET_STD, TEACHER_CHANNELS

if TYPE_CHECKING:
    from training.checkpoint import Checkpoint

MAP_PADDING = 4  # px of zeros around the normalised map before upsampling (paper's reference code)
QUANTILE_NAMES = ("q_st_a", "q_st_b", "q_ae_a", "q_ae_b")


@dataclass
class MapStatistics:
    teacher_mean: torch.Tensor  # (384,)
    teacher_std: torch.Tensor  # (384,)
    q_st_a: torch.Tensor  # () 0.9 quantile of map_st on validation images
    q_st_b: torch.Tensor  # () 0.995 quantile of map_st
    q_ae_a: torch.Tensor  # () 0.9 quantile of map_ae
    q_ae_b: torch.Tensor  # () 0.995 quantile of map_ae

    TENSOR_NAMES = ("teacher_mean", "teacher_std", *QUANTILE_NAMES)

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


def normalise_unit_images(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float RGB in [0, 1] -> (N, 3, H, W) ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def imagenet_normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 RGB -> (N, 3, H, W) float32 ImageNet-normalised."""
    return normalise_unit_images(images_uint8.float() / 255.0)


def _scalar(value: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32).detach().reshape(()).clone().cpu()


class MapHead(nn.Module):
    """Features -> (anomaly_map (N, 1, H, W), score (N,)): distances, quantile norm, pad, upsample, max."""

    def __init__(self, stats: MapStatistics, image_size: tuple[int, int], teacher_channels: int):
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.teacher_channels = int(teacher_channels)
        for name in QUANTILE_NAMES:
            self.register_buffer(name, _scalar(getattr(stats, name)))

    def distances(
        self, teacher_features: torch.Tensor, student_features: torch.Tensor, ae_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw maps (map_st, map_ae), each (N, 1, h, w), before quantile normalisation."""
        channels = self.teacher_channels
        # (N, 384, h, w) each; teacher features are already channel-normalised
        map_st = ((teacher_features - student_features[:, :channels]) ** 2).mean(dim=1, keepdim=True)
        map_ae = ((ae_features - student_features[:, channels:]) ** 2).mean(dim=1, keepdim=True)
        return map_st, map_ae

    def forward(
        self, teacher_features: torch.Tensor, student_features: torch.Tensor, ae_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        map_st, map_ae = self.distances(teacher_features, student_features, ae_features)
        map_st = 0.1 * (map_st - self.q_st_a) / (self.q_st_b - self.q_st_a)  # (N, 1, h, w)
        map_ae = 0.1 * (map_ae - self.q_ae_a) / (self.q_ae_b - self.q_ae_a)
        combined = 0.5 * map_st + 0.5 * map_ae
        combined = F.pad(combined, (MAP_PADDING,) * 4)  # (N, 1, h + 8, w + 8)
        anomaly_map = F.interpolate(combined, size=self.image_size, mode="bilinear", align_corners=False)
        score = anomaly_map.amax(dim=(1, 2, 3))  # (N,)
        return anomaly_map, score


class EfficientAD(nn.Module):
    """ImageNet-normalised (N, 3, H, W) -> (anomaly_map (N, 1, H, W), score (N,)); H x W = `image_size`."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        autoencoder: nn.Module,
        stats: MapStatistics | None = None,
        *,
        image_size: int | tuple[int, int],
        teacher_channels: int = TEACHER_CHANNELS,
    ):
        super().__init__()
        stats = stats or MapStatistics.identity(teacher_channels)
        size = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.teacher = teacher
        self.student = student
        self.autoencoder = autoencoder
        self.register_buffer("teacher_mean", stats.teacher_mean.detach().float().cpu().clone())  # (384,)
        self.register_buffer("teacher_std", stats.teacher_std.detach().float().cpu().clone())  # (384,)
        self.map_head = MapHead(stats, size, teacher_channels)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> EfficientAD:
        """The checkpoint's networks and statistics as one module, on the checkpoint's device, eval mode."""
        teacher, student, autoencoder = checkpoint.networks()
        device = checkpoint.stats.teacher_mean.device
        model = cls(
            teacher,
            student,
            autoencoder,
            checkpoint.stats,
            image_size=checkpoint.config.image_size,
            teacher_channels=checkpoint.config.teacher_channels,
        )
        return model.to(device).eval()

    @property
    def image_size(self) -> tuple[int, int]:
        return self.map_head.image_size

    @property
    def stats(self) -> MapStatistics:
        """The statistics as plain tensors (copies, on the module's device)."""
        return MapStatistics(
            teacher_mean=self.teacher_mean.clone(),
            teacher_std=self.teacher_std.clone(),
            **{name: getattr(self.map_head, name).clone() for name in QUANTILE_NAMES},
        )

    @torch.no_grad()
    def set_statistics(self, stats: MapStatistics) -> None:
        """Copy `stats` into the buffers (shapes must match)."""
        self.teacher_mean.copy_(stats.teacher_mean)
        self.teacher_std.copy_(stats.teacher_std)
        for name in QUANTILE_NAMES:
            getattr(self.map_head, name).copy_(_scalar(getattr(stats, name)))

    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised -> (N, 384, h, w) teacher features, channel-normalised."""
        mean, std = self.teacher_mean.view(1, -1, 1, 1), self.teacher_std.view(1, -1, 1, 1)
        return (self.teacher(images) - mean) / std

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(teacher (N, 384, h, w) channel-normalised, student (N, 768, h, w), autoencoder (N, 384, h, w))."""
        return self.teacher_features(images), self.student(images), self.autoencoder(images)

    def raw_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) normalised -> (map_st, map_ae), each (N, 1, h, w), not yet quantile-normalised."""
        return self.map_head.distances(*self.features(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) normalised -> (anomaly_map (N, 1, H, W), score (N,) = max of the map)."""
        return self.map_head(*self.features(images))
