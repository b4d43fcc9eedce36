"""The fused inference module: uint8 RGB images in, anomaly map and score out, in one graph.

It computes exactly what `training.anomaly_maps.anomaly_maps` computes on `imagenet_normalise(images)`,
with every constant held as a registered buffer so that the ONNX export carries it:

    image (N,3,H,W) uint8 -> /255, ImageNet mean/std -> teacher, student, autoencoder
    teacher features normalised per channel (folded into the teacher's last conv, see below)
    map_st = mean_c (T - S[:384])^2, map_ae = mean_c (AE - S[384:])^2          # (N, 1, h, w)
    each quantile-normalised 0.1 (m - q_a) / (q_b - q_a), averaged 0.5 / 0.5
    zero-padded by 4 px, bilinearly upsampled (align_corners=False) to H x W  # (N, 1, H, W)
    score = max of the map                                                    # (N,)

Folding: the teacher's channel normalisation (T - mean) / std is folded into the weights and bias of the
teacher's last convolution (exact up to float rounding: that layer is linear and nothing follows it). The
ImageNet normalisation is NOT folded into the first convolutions: the autoencoder's first conv zero-pads,
and a zero in normalised space is not a zero in pixel space, so folding would change the border pixels.

All post-network arithmetic lives in the `map_head` submodule, so its ONNX nodes are named
`/map_head/...`; the TensorRT builder keeps exactly those layers in FP32.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from training.anomaly_maps import MAP_PADDING, MapStatistics
from training.checkpoint import Checkpoint
from training.networks import IMAGENET_MEAN, IMAGENET_STD

MAP_HEAD_SCOPE = (
    "map_head"  # module name; ONNX node names of the precision-sensitive tail start with "/map_head/"
)


def fold_channel_normalisation(conv: nn.Conv2d, mean: torch.Tensor, std: torch.Tensor) -> nn.Conv2d:
    """A copy of `conv` whose output equals (conv(x) - mean) / std per output channel."""
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        folded.weight.copy_(conv.weight / std.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
        folded.bias = nn.Parameter((bias - mean) / std)
    return folded


def _teacher_with_normalisation(teacher: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> nn.Module:
    """A copy of the teacher PDN whose output is already channel-normalised (its last layer is a conv)."""
    folded = copy.deepcopy(teacher).cpu()
    last = folded.layers[-1]
    if not isinstance(last, nn.Conv2d):
        raise TypeError(f"expected the teacher's last layer to be a Conv2d, got {type(last).__name__}")
    folded.layers[-1] = fold_channel_normalisation(last, mean, std)
    return folded


class MapHead(nn.Module):
    """Features -> (anomaly_map (N,1,H,W), score (N,)): distances, quantile norm, pad, upsample, max."""

    def __init__(self, stats: MapStatistics, image_size: tuple[int, int], teacher_channels: int):
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.teacher_channels = int(teacher_channels)
        for name in ("q_st_a", "q_st_b", "q_ae_a", "q_ae_b"):
            self.register_buffer(name, getattr(stats, name).detach().float().reshape(()).clone())

    def forward(
        self, teacher_features: torch.Tensor, student_features: torch.Tensor, ae_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        channels = self.teacher_channels
        # (N, 384, h, w) each; teacher features are already channel-normalised
        map_st = ((teacher_features - student_features[:, :channels]) ** 2).mean(dim=1, keepdim=True)
        map_ae = ((ae_features - student_features[:, channels:]) ** 2).mean(dim=1, keepdim=True)
        map_st = 0.1 * (map_st - self.q_st_a) / (self.q_st_b - self.q_st_a)  # (N, 1, h, w)
        map_ae = 0.1 * (map_ae - self.q_ae_a) / (self.q_ae_b - self.q_ae_a)
        combined = 0.5 * map_st + 0.5 * map_ae
        combined = F.pad(combined, (MAP_PADDING,) * 4)  # (N, 1, h + 8, w + 8)
        anomaly_map = F.interpolate(combined, size=self.image_size, mode="bilinear", align_corners=False)
        score = anomaly_map.amax(dim=(1, 2, 3))  # (N,)
        return anomaly_map, score


class FusedEfficientAD(nn.Module):
    """uint8 RGB (N, 3, H, W) -> (anomaly_map (N, 1, H, W) float32, score (N,) float32); eval mode only."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        autoencoder: nn.Module,
        stats: MapStatistics,
        image_size: tuple[int, int],
        teacher_channels: int = 384,
        *,
        fold_teacher_normalisation: bool = True,
    ):
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.register_buffer(
            "imagenet_mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        )
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))
        # Kept for reference (and for model.json); the graph uses them folded into the teacher's last conv.
        self.register_buffer("teacher_mean", stats.teacher_mean.detach().float().cpu().clone())
        self.register_buffer("teacher_std", stats.teacher_std.detach().float().cpu().clone())
        self.fold_teacher_normalisation = fold_teacher_normalisation
        if fold_teacher_normalisation:
            self.teacher = _teacher_with_normalisation(teacher, self.teacher_mean, self.teacher_std)
        else:  # explicit (T - mean) / std in the graph; kept for measuring what the folding buys
            self.teacher = copy.deepcopy(teacher).cpu()
        self.student = copy.deepcopy(student).cpu()
        self.autoencoder = copy.deepcopy(autoencoder).cpu()
        self.map_head = MapHead(
            MapStatistics(**{k: v.detach().cpu() for k, v in stats.as_dict().items()}),
            self.image_size,
            teacher_channels,
        )
        self.eval()

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, *, fold_teacher_normalisation: bool = True
    ) -> FusedEfficientAD:
        size = checkpoint.config.image_size
        return cls(
            checkpoint.teacher,
            checkpoint.student,
            checkpoint.autoencoder,
            checkpoint.stats,
            image_size=(size, size),
            teacher_channels=checkpoint.config.teacher_channels,
            fold_teacher_normalisation=fold_teacher_normalisation,
        )

    def train(self, mode: bool = True) -> FusedEfficientAD:
        """Inference only: the fused module has no training branch, so it stays in eval mode (dropout off)."""
        return super().train(False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = (image.float() / 255.0 - self.imagenet_mean) / self.imagenet_std  # (N, 3, H, W)
        teacher_features = self.teacher(images)  # (N, 384, h, w), channel-normalised when folded
        if not self.fold_teacher_normalisation:
            mean, std = self.teacher_mean.view(1, -1, 1, 1), self.teacher_std.view(1, -1, 1, 1)
            teacher_features = (teacher_features - mean) / std
        student_features = self.student(images)  # (N, 768, h, w)
        ae_features = self.autoencoder(images)  # (N, 384, h, w)
        return self.map_head(teacher_features, student_features, ae_features)
