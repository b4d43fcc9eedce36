"""What is specific to the exported graph, on top of the one EfficientAD module (`training.model`):

- uint8 RGB input: /255 and the ImageNet mean/std happen inside the graph (4x fewer bytes to the GPU);
- the teacher's channel normalisation (T - mean) / std folded into the weights and bias of the teacher's
  last convolution (exact up to float rounding: that layer is linear and nothing follows it);
- the `map_head` submodule at the top level, so the ONNX nodes of the precision-sensitive tail are named
  `/map_head/...` and the TensorRT builder keeps exactly those layers in FP32.

The ImageNet normalisation is NOT folded into the first convolutions: the autoencoder's first conv
zero-pads, and a zero in normalised space is not a zero in pixel space, so folding would change the border
pixels. Everything after the networks is `EfficientAD.map_head` itself, so the graph's map and score are
the module's by construction; export/parity.py checks ONNX Runtime against the module on real images.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from training.checkpoint import Checkpoint
from training.model import EfficientAD
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


class FusedEfficientAD(nn.Module):
    """uint8 RGB (N, 3, H, W) -> (anomaly_map (N, 1, H, W) float32, score (N,) float32); eval mode only."""

    def __init__(self, model: EfficientAD, *, fold_teacher_normalisation: bool = True):
        super().__init__()
        model = copy.deepcopy(model).cpu().eval()
        self.image_size = model.image_size
        self.register_buffer(
            "imagenet_mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        )
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))
        # Kept for reference (and for model.json); the graph uses them folded into the teacher's last conv.
        self.register_buffer("teacher_mean", model.teacher_mean.clone())  # (384,)
        self.register_buffer("teacher_std", model.teacher_std.clone())  # (384,)
        self.fold_teacher_normalisation = fold_teacher_normalisation
        if fold_teacher_normalisation:
            self.teacher = _teacher_with_normalisation(model.teacher, self.teacher_mean, self.teacher_std)
        else:  # explicit (T - mean) / std in the graph; kept for measuring what the folding buys
            self.teacher = model.teacher
        self.student = model.student
        self.autoencoder = model.autoencoder
        self.map_head = model.map_head
        self.eval()

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, *, fold_teacher_normalisation: bool = True
    ) -> FusedEfficientAD:
        return cls(
            EfficientAD.from_checkpoint(checkpoint), fold_teacher_normalisation=fold_teacher_normalisation
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
