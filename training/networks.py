"""EfficientAD networks: the patch description networks (PDN-S, PDN-M) and the autoencoder.

Built bottom-up as in the paper (Batzner et al., WACV 2024, Tables 6-8). Without padding a 256x256 input
gives a 56x56 feature grid (each cell sees a 33x33 patch); with padding (used for distillation) the grid
is 64x64.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

ModelSize = Literal["small", "medium"]

TEACHER_CHANNELS = 384
STUDENT_CHANNELS = 2 * TEACHER_CHANNELS  # first half vs the teacher, second half vs the autoencoder
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PDN_STRIDE = 4  # input pixels per output cell of the padded PDN (its 64x64 grid at 256 px)
# Cells on each side of the padded PDN's grid that the unpadded PDN (training and serving) does not have:
# the unpadded output equals the padded one without this border (56 = 64 - 2 * 4 at 256 px).
PDN_BORDER_CELLS = 4


class PDN(nn.Module):
    """Patch description network. `size` picks PDN-S or PDN-M; `padding` is on only for distillation."""

    def __init__(
        self, *, size: ModelSize = "small", out_channels: int = TEACHER_CHANNELS, padding: bool = False
    ):
        super().__init__()
        if size not in ("small", "medium"):
            raise ValueError(f"PDN size must be 'small' or 'medium', got {size!r}")
        self.size = size
        self.out_channels = out_channels
        self.padding = padding
        p = 1 if padding else 0
        if size == "small":
            layers: list[nn.Module] = [
                nn.Conv2d(3, 128, 4, padding=3 * p), nn.ReLU(inplace=True),
                nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(128, 256, 4, padding=3 * p), nn.ReLU(inplace=True),
                nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(256, 256, 3, padding=p), nn.ReLU(inplace=True),
                nn.Conv2d(256, out_channels, 4),
            ]  # fmt: skip
        else:
            layers = [
                nn.Conv2d(3, 256, 4, padding=3 * p), nn.ReLU(inplace=True),
                nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(256, 512, 4, padding=3 * p), nn.ReLU(inplace=True),
                nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(512, 512, 1), nn.ReLU(inplace=True),
                nn.Conv2d(512, 512, 3, padding=p), nn.ReLU(inplace=True),
                nn.Conv2d(512, out_channels, 4), nn.ReLU(inplace=True),
                nn.Conv2d(out_channels, out_channels, 1),
            ]  # fmt: skip
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # (N, 3, 256, 256) -> (N, C, 56, 56) without padding, (N, C, 64, 64) with padding
        return self.layers(images)


def pdn_output_size(image_size: int, *, padding: bool = False) -> int:
    """Side of the PDN feature grid for a square input (the same for S and M)."""
    side = image_size
    if padding:
        side = side + 6 - 3  # conv k4 p3
        side = (side + 2 - 2) // 2 + 1  # avgpool 2/2 p1
        side = side + 6 - 3
        side = (side + 2 - 2) // 2 + 1
        side = side + 2 - 2  # conv k3 p1
        return side - 3  # conv k4
    side = (side - 3) // 2
    side = (side - 3) // 2
    return side - 2 - 3


def _decoder_stage_sizes(image_size: int) -> list[int]:
    """Sizes the decoder upsamples to before each k4 conv; the paper's values at 256 px, scaled otherwise."""
    scale = image_size / 256
    return [max(2, round(size * scale)) for size in (3, 8, 15, 32, 63, 127)]


class Autoencoder(nn.Module):
    """Encoder down to a 64x1x1 code, decoder back up to the PDN's output grid with 384 channels."""

    def __init__(self, *, out_channels: int = TEACHER_CHANNELS, image_size: int = 256, dropout: float = 0.2):
        super().__init__()
        if image_size < 64 or image_size % 32:
            raise ValueError(f"autoencoder input size must be a multiple of 32 and >= 64, got {image_size}")
        self.image_size = image_size
        self.output_size = pdn_output_size(image_size)
        bottleneck_kernel = image_size // 32  # 8 at 256 px
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),   # (N, 32, 128, 128)
            nn.Conv2d(32, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),  # (N, 32, 64, 64)
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(inplace=True),  # (N, 64, 32, 32)
            nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(inplace=True),  # (N, 64, 16, 16)
            nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(inplace=True),  # (N, 64, 8, 8)
            nn.Conv2d(64, 64, bottleneck_kernel),                              # (N, 64, 1, 1)
        )  # fmt: skip
        stages: list[nn.Module] = []
        for size in _decoder_stage_sizes(image_size):
            stages += [
                nn.Upsample(size=size, mode="bilinear", align_corners=False),
                nn.Conv2d(64, 64, 4, stride=1, padding=2),  # size -> size + 1
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            ]
        stages += [
            nn.Upsample(size=self.output_size, mode="bilinear", align_corners=False),  # (N, 64, 56, 56)
            nn.Conv2d(64, 64, 3, stride=1, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, out_channels, 3, stride=1, padding=1),                       # (N, 384, 56, 56)
        ]  # fmt: skip
        self.decoder = nn.Sequential(*stages)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # (N, 3, H, W) -> (N, 384, h, w) on the PDN's output grid
        return self.decoder(self.encoder(images))


def build_networks(size: ModelSize = "small", image_size: int = 256) -> tuple[PDN, PDN, Autoencoder]:
    """Teacher (384 ch), student (768 ch) and autoencoder for detection (no padding)."""
    teacher = PDN(size=size, out_channels=TEACHER_CHANNELS)
    student = PDN(size=size, out_channels=STUDENT_CHANNELS)
    autoencoder = Autoencoder(out_channels=TEACHER_CHANNELS, image_size=image_size)
    return teacher, student, autoencoder
