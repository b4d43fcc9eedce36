"""Teacher distillation: train the PDN to reproduce a pretrained backbone's features (paper, Sec. 3.1).

The PDN (with padding, so its 64x64 grid at 256 px lines up with the backbone's) sees each image at the
PDN resolution with ImageNet normalisation; the backbone sees the same image at twice that resolution.
The backbone's features are standardised per channel with a mean and std estimated on up to
`STATISTICS_IMAGES` of the distillation images; the loss is the mean squared error to those targets.

What makes it affordable on a CPU:
- Random crops (`crop_size`): the PDN is fully convolutional with a 33-px receptive field, so a crop at a
  position that is a multiple of 4 px gives the matching window of the whole image's output grid (away
  from the crop's padded border). The PDN runs on the crop, the target is the same window of the backbone
  features of the whole image: about a quarter of the cost per image for 128-px crops of 256-px images.
- Targets computed once: the backbone's standardised features of each image (and of its grayscale
  version, the one augmentation, p = 0.1 as in the reference pretraining) are cached in memory as
  float16 up to `cache_gb`; the images are decoded once. On a 2-core CPU the backbone (1.6 s for 8
  images at 512 px) otherwise costs more than the PDN step on 96-px crops (0.9 s).
- bfloat16 autocast where the hardware computes it natively (`precision`, see training.device).

Resumable: every `save_every` steps, on Ctrl-C and on SIGTERM, ONE file `<out>.state.safetensors` (weights,
Adam moments, statistics, losses, settings; no pickle; training.run_state) is written; `resume=True`
continues from it. Each step's
random draws come from a generator seeded with (seed, step) and every target is computed one image at a
time, so a resumed run on the CPU repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from efficientad.errors import UserError
from training.augment import GRAY_WEIGHTS
from training.backbones import BACKBONES, Backbone, BackboneTarget
from training.checkpoint import file_sha256, versions
from training.device import autocast, resolve_device, resolve_precision
from training.images import list_images, load_rgb, to_uint8_tensor
from training.model import imagenet_normalise
from training.networks import PDN, PDN_BORDER_CELLS, PDN_STRIDE, TEACHER_CHANNELS, ModelSize
from training.run_state import RunState, load_run_state, resumed_settings, save_run_state
from training.signals import sigterm_as_interrupt
from training.teacher_file import save_teacher

logger = logging.getLogger(__name__)

STATISTICS_IMAGES = 256  # images used to estimate the backbone's channel mean and std
GRAYSCALE_PROBABILITY = 0.1  # as in the paper's reference pretraining
PROGRESS_EVERY = 10  # steps between loss updates on the progress bar
CONTENT_FINGERPRINT_LIMIT = 20_000  # larger folders are fingerprinted by file names and sizes
LOSS_WINDOW = 100  # initial and final loss: means over the first and last this many steps (<= steps/4)
IMAGE_CACHE_LIMIT = 20_000  # folders up to this many images keep their decoded PDN-size images in memory
STATE_KIND = "efficientad-distill-state"
MIN_CROP = 48  # px: 12 cells, of which the 4 x 4 interior (PDN_BORDER_CELLS off each side) carries the loss


@dataclass
class DistillSettings:
    backbone: str = "efficientnet-lite0"
    target: str | None = None  # a target variant ("lite0-s8s16", see BackboneTarget); None: `backbone`
    size: ModelSize = "small"
    steps: int = 10_000
    batch_size: int = 8
    image_size: int = 256
    crop_size: int | None = None  # None: whole images
    precision: str = "auto"
    seed: int = 0
    learning_rate: float = 1e-4
    weight_decay: float = 1e-5
    cache_gb: float = 8.0  # memory for cached backbone targets
    save_every: int = 500  # steps between resumable states; 0: only on Ctrl-C
    device: str = "auto"

    def check(self) -> None:
        if self.target is not None:
            self.backbone_target()  # a BackboneError naming the variant if it cannot be parsed
        elif self.backbone not in BACKBONES:
            raise UserError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.size not in ("small", "medium"):
            raise UserError(f"--size must be small or medium, got {self.size!r}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.image_size < MIN_CROP or self.image_size % PDN_STRIDE:
            raise UserError(
                f"--image-size must be a multiple of 4 and at least {MIN_CROP}, got {self.image_size}"
            )
        crop = self.crop_size
        if crop is not None and (crop < MIN_CROP or crop % PDN_STRIDE or crop > self.image_size):
            raise UserError(
                f"--crop-size must be a multiple of 4, at least {MIN_CROP} and at most --image-size "
                f"({self.image_size}), got {crop}"
            )
        if self.save_every < 0:
            raise UserError(f"--save-every must be >= 0, got {self.save_every}")
        if self.cache_gb < 0:
            raise UserError(f"--cache-gb must be >= 0, got {self.cache_gb}")

    @property
    def crop(self) -> int:
        return self.crop_size or self.image_size

    def backbone_target(self) -> BackboneTarget:
        """What the PDN learns: `target` if given (it names its own backbone), else `backbone`'s default."""
        if self.target is not None:
            return BackboneTarget.parse(self.target)
        return BackboneTarget(backbone=self.backbone)


def dataset_fingerprint(paths: list[Path]) -> tuple[str, str]:
    """(sha256 hex, what it covers) over the image files in sorted order.

    Up to CONTENT_FINGERPRINT_LIMIT files: each file's name and content sha256 (the scheme of
    `training.data.data_fingerprint`); beyond that (ImageNet-sized folders) names and sizes only, so that
    starting a run does not read every byte twice.
    """
    digest = hashlib.sha256()
    by_content = len(paths) <= CONTENT_FINGERPRINT_LIMIT
    for path in sorted(paths):
        detail = file_sha256(path) if by_content else str(path.stat().st_size)
        digest.update(f"{path.name}\0{detail}\n".encode())
    return digest.hexdigest(), "names+contents" if by_content else "names+sizes"


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 RGB -> the same shape, each pixel its luma in all three channels."""
    weights = torch.tensor(GRAY_WEIGHTS, dtype=torch.float32).view(3, 1, 1)
    luma = (images.float() * weights).sum(dim=-3, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    return luma.expand_as(images).contiguous()


def crop_window(features: torch.Tensor, top: int, left: int, crop: int) -> torch.Tensor:
    """The cells of a (..., g, g) PDN-grid map that a `crop`-px crop at pixel (top, left) covers."""
    cells, row, column = crop // PDN_STRIDE, top // PDN_STRIDE, left // PDN_STRIDE
    return features[..., row : row + cells, column : column + cells]


class DistillationImages:
    """The distillation images, decoded on demand (once, for folders up to IMAGE_CACHE_LIMIT images)."""

    def __init__(self, paths: list[Path], *, image_size: int, backbone_size: int):
        self.paths = paths
        self.image_size = image_size
        self.backbone_size = backbone_size
        self._pdn_images: dict[int, torch.Tensor] = {}
        self._keep = len(paths) <= IMAGE_CACHE_LIMIT

    def __len__(self) -> int:
        return len(self.paths)

    def pdn_image(self, index: int) -> torch.Tensor:
        """(3, S, S) uint8 at the PDN's image size."""
        cached = self._pdn_images.get(index)
        if cached is None:
            cached = to_uint8_tensor(load_rgb(self.paths[index]), self.image_size)
            if self._keep:
                self._pdn_images[index] = cached
        return cached

    def backbone_image(self, index: int) -> torch.Tensor:
        """(3, 2S, 2S) uint8 at the backbone's input size (not cached: only needed for a new target)."""
        return to_uint8_tensor(load_rgb(self.paths[index]), self.backbone_size)


@torch.no_grad()
def backbone_features(
    backbone: Backbone, images_uint8: torch.Tensor, precision: str = "fp32"
) -> torch.Tensor:
    """(N, 3, 2S, 2S) uint8 -> (N, 384, g, g) float32 features."""
    images = images_uint8.float() / 255.0
    with autocast(images.device, precision):
        return backbone(images).float()


class DistillationTargets:
    """Standardised backbone features per (image, grayscale), computed one image at a time and cached
    as float16 while they fit in `cache_bytes` (one image at 256 px: 384 x 64 x 64 x 2 B = 3.1 MB)."""

    def __init__(
        self,
        images: DistillationImages,
        backbone: Backbone,
        device: torch.device,
        *,
        precision: str,
        cache_bytes: float,
    ):
        self.images = images
        self.backbone = backbone
        self.device = device
        self.precision = precision
        self.cache_bytes = cache_bytes
        self.mean = torch.zeros(1, TEACHER_CHANNELS, 1, 1)
        self.std = torch.ones(1, TEACHER_CHANNELS, 1, 1)
        self._cache: dict[tuple[int, bool], torch.Tensor] = {}
        self._cached_bytes = 0
        self.computed = 0  # backbone passes so far (for the log)

    def raw(self, index: int, gray: bool) -> torch.Tensor:
        """(384, g, g) float32 backbone features of one image, on the CPU."""
        image = self.images.backbone_image(index)
        if gray:
            image = grayscale(image)
        self.computed += 1
        return backbone_features(self.backbone, image[None].to(self.device), self.precision)[0].cpu()

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean, self.std = mean.view(1, -1, 1, 1).cpu(), std.view(1, -1, 1, 1).cpu()

    def store(self, key: tuple[int, bool], raw: torch.Tensor) -> torch.Tensor:
        """Standardise `raw` (384, g, g), keep it if the cache has room, return it as float32."""
        standardised = ((raw - self.mean[0]) / self.std[0]).to(torch.float16)
        if self._cached_bytes + standardised.nbytes <= self.cache_bytes:
            self._cache[key] = standardised
            self._cached_bytes += standardised.nbytes
        return standardised.float()

    def get(self, index: int, gray: bool) -> torch.Tensor:
        """(384, g, g) float32 standardised target (float16-rounded, cached or not, so results agree)."""
        cached = self._cache.get((index, gray))
        if cached is not None:
            return cached.float()
        return self.store((index, gray), self.raw(index, gray))


@torch.no_grad()
def feature_statistics(
    targets: DistillationTargets, indices: list[int]
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Per-channel mean and std (384,) of the backbone features over `indices`; also the raw features."""
    total = torch.zeros(TEACHER_CHANNELS, dtype=torch.float64)
    total_squares = torch.zeros_like(total)
    count = 0
    raws: dict[int, torch.Tensor] = {}
    for index in tqdm(indices, desc="feature statistics", unit="img", leave=False):
        features = targets.raw(index, gray=False)  # (384, g, g)
        raws[index] = features
        features = features.double()
        total += features.sum(dim=(1, 2))
        total_squares += features.square().sum(dim=(1, 2))
        count += features.shape[1] * features.shape[2]
    mean = total / count
    variance = (total_squares / count - mean.square()).clamp_min(0.0)
    return mean.float(), variance.sqrt().clamp_min(1e-6).float(), raws  # (384,), (384,), {i: (384, g, g)}


@dataclass(frozen=True)
class StepDraws:
    """One step's random choices: image indices, grayscale flags, crop corners (multiples of 4 px)."""

    indices: list[int]
    gray: list[bool]
    tops: list[int]
    lefts: list[int]


def draws_for_step(settings: DistillSettings, step: int, num_images: int) -> StepDraws:
    """Reproducible from (seed, step) alone, so a resumed run draws what the uninterrupted one did."""
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    batch = settings.batch_size
    positions = (settings.image_size - settings.crop) // PDN_STRIDE + 1
    indices = torch.randint(0, num_images, (batch,), generator=generator).tolist()
    gray = (torch.rand(batch, generator=generator) < GRAYSCALE_PROBABILITY).tolist()
    corners = (torch.randint(0, positions, (2, batch), generator=generator) * PDN_STRIDE).tolist()
    return StepDraws(indices, gray, corners[0], corners[1])


def step_batch(
    draws: StepDraws, images: DistillationImages, targets: DistillationTargets, crop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, crop, crop) uint8 PDN inputs and (B, 384, crop/4, crop/4) float32 targets for one step."""
    inputs, outputs = [], []
    for index, gray, top, left in zip(draws.indices, draws.gray, draws.tops, draws.lefts, strict=True):
        image = images.pdn_image(index)
        if gray:
            image = grayscale(image)
        inputs.append(image[:, top : top + crop, left : left + crop])
        outputs.append(crop_window(targets.get(index, gray), top, left, crop))
    return torch.stack(inputs), torch.stack(outputs)


def distill_step(
    teacher: PDN,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    device: torch.device,
    precision: str,
) -> torch.Tensor:
    """One Adam step of the PDN on (B, 3, c, c) uint8 images towards (B, 384, c/4, c/4) targets; the loss.

    The loss covers the interior cells only: the teacher is used without padding (training, serving), and
    the unpadded PDN's output is exactly the padded one without its `PDN_BORDER_CELLS` border, whose cells
    see the zero padding. Fitting the border would spend the PDN's capacity on cells never used.
    """
    border = PDN_BORDER_CELLS
    inside = (..., slice(border, -border), slice(border, -border))
    with autocast(device, precision):
        # the PDN sees ImageNet-normalised images, as in training and serving
        pixels = imagenet_normalise(images.to(device))  # (B, 3, c, c)
        if device.type == "cpu":
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        predictions = teacher(pixels)  # (B, 384, c/4, c/4)
    loss = F.mse_loss(predictions[inside].float(), targets.to(device)[inside])  # fp32, (c/4 - 8)^2 cells
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


# ----------------------------------------------------------------------------- resumable state


def state_path(out: Path) -> Path:
    """<out>.state.safetensors next to the teacher file: the one resumable-state file."""
    out = Path(out)
    return out.with_name(out.name + ".state.safetensors")


def read_state(out: Path) -> RunState:
    """The resumable state of the unfinished distillation that writes `out`."""
    return load_run_state(state_path(out), kind=STATE_KIND, what="a distillation state")


def saved_distill_settings(out: Path) -> DistillSettings:
    """The settings of the unfinished distillation that writes `out`."""
    return read_state(out).settings(DistillSettings)


# ----------------------------------------------------------------------------- the loop


def distill_teacher(
    image_dir: Path,
    out: Path,
    settings: DistillSettings | None = None,
    *,
    resume: bool = False,
    backbone_weights: Path | None = None,
    stop_after_step: int | None = None,
    **overrides: Any,
) -> Path:
    """Distill a teacher PDN on the images in `image_dir` and write it to `out`; returns `out`.

    `settings` and `overrides` (DistillSettings fields, e.g. steps=20): the run's settings. `resume` continues
    the unfinished run that writes `out` with its saved settings; what is asked for again must match them,
    except the settings in training.run_state.RESUME_MAY_CHANGE (a new learning rate is recorded as a
    schedule). `stop_after_step` saves a resumable state after that step and returns without writing the
    teacher.
    """
    out = Path(out)
    paths = list_images(Path(image_dir))
    fingerprint, fingerprint_covers = dataset_fingerprint(paths)
    state = read_state(out) if resume else None
    start_step, seconds_before = 0, 0.0
    if state is not None:
        given = {**(asdict(settings) if settings is not None else {}), **overrides}
        settings = resumed_settings(
            state.settings(DistillSettings), given, what=f"the distillation for {out}"
        )
        if settings.steps < state.step:
            raise UserError(f"--steps {settings.steps} is below the step the run reached ({state.step})")
        if state.document["dataset_fingerprint"] != fingerprint:
            raise UserError(f"the images in {image_dir} changed since the distillation started")
        start_step, seconds_before = state.step, float(state.document["seconds"])
        schedule = state.document["learning_rate_schedule"]
        if settings.learning_rate != schedule[-1][1]:
            schedule.append([start_step, settings.learning_rate])
            logger.info("learning rate %g from step %d on", settings.learning_rate, start_step)
    else:
        settings = replace(settings or DistillSettings(), **overrides)
        schedule = [[0, settings.learning_rate]]  # [first step, learning rate] entries
    settings.check()
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    torch.manual_seed(settings.seed)
    target = settings.backbone_target()
    logger.info(
        "distilling a PDN-%s teacher from %s on %d images on %s (%s, %s px crops of %s px)",
        settings.size, target.name, len(paths), device, precision, settings.crop, settings.image_size,
    )  # fmt: skip

    extractor = target.build(image_size=settings.image_size, weights=backbone_weights, device=device)
    images = DistillationImages(paths, image_size=settings.image_size, backbone_size=extractor.input_size)
    targets = DistillationTargets(
        images, extractor, device, precision=precision, cache_bytes=settings.cache_gb * 2**30
    )
    teacher = PDN(size=settings.size, out_channels=TEACHER_CHANNELS, padding=True).to(device).train()
    if device.type == "cpu":  # oneDNN's convolutions: ~10% faster per step in NHWC (measured, bf16 and fp32)
        teacher = teacher.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(
        teacher.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    losses = torch.zeros(settings.steps, device=device)  # kept on the device: no sync per step
    order = torch.Generator().manual_seed(settings.seed)
    statistics_indices = torch.randperm(len(paths), generator=order)[:STATISTICS_IMAGES].tolist()
    if state is not None:
        state.restore_module(teacher, "teacher")
        state.restore_optimizer(optimizer)
        targets.set_statistics(state.tensors["stats.mean"], state.tensors["stats.std"])
        losses[:start_step] = state.tensors["losses"][:start_step].to(device)
        logger.info("resuming %s at step %d of %d", out, start_step, settings.steps)
    else:
        mean, std, raws = feature_statistics(targets, statistics_indices)
        targets.set_statistics(mean, std)
        for index, raw in raws.items():  # the statistics' forward passes double as the first targets
            targets.store((index, False), raw)
        del raws

    end_step = settings.steps if stop_after_step is None else min(settings.steps, stop_after_step)
    step = start_step
    started = time.monotonic()

    def save_state() -> None:
        save_run_state(
            state_path(out),
            kind=STATE_KIND,
            document={
                "step": step,
                "settings": asdict(settings),
                "seconds": seconds_before + time.monotonic() - started,
                "dataset_fingerprint": fingerprint,
                "learning_rate_schedule": schedule,
            },
            modules={"teacher": teacher},
            optimizer=optimizer,
            tensors={"stats.mean": targets.mean, "stats.std": targets.std, "losses": losses[:step]},
        )

    progress = tqdm(
        total=settings.steps,
        initial=start_step,
        desc=f"distill {target.name} -> PDN-{settings.size[0].upper()}",
        unit="step",
        dynamic_ncols=True,
    )
    try:
        with sigterm_as_interrupt():
            while step < end_step:
                draws = draws_for_step(settings, step, len(paths))
                pdn_images, step_targets = step_batch(draws, images, targets, settings.crop)
                loss = distill_step(teacher, optimizer, pdn_images, step_targets, device, precision)
                losses[step] = loss.detach()
                step += 1
                progress.update(1)
                if step % PROGRESS_EVERY == 0 or step == end_step:
                    progress.set_postfix(loss=f"{loss.item():.4f}", targets=targets.computed)
                if settings.save_every and step % settings.save_every == 0 and step < settings.steps:
                    save_state()
    except KeyboardInterrupt:
        save_state()
        logger.warning("interrupted at step %d: continue with --resume", step)
        raise
    finally:
        progress.close()
    if step < settings.steps:
        save_state()
        logger.info("stopped after step %d of %d: continue with --resume", step, settings.steps)
        return out

    window = max(1, min(LOSS_WINDOW, settings.steps // 4))
    initial_loss, final_loss = losses[:window].mean().item(), losses[-window:].mean().item()
    if not math.isfinite(final_loss):
        raise UserError(f"distillation diverged (loss {final_loss}); try a lower learning rate")
    seconds = seconds_before + time.monotonic() - started
    logger.info("distillation done in %.0f s, final loss %.4f", seconds, final_loss)

    metadata = {
        "backbone": target.backbone,
        "target": target.name,
        "target_strides": json.dumps(list(extractor.strides)),
        "target_input_scale": f"{target.input_scale:g}",
        "backbone_weights": extractor.weights_path.name,
        "backbone_weights_sha256": file_sha256(extractor.weights_path),
        "aggregation": "patchcore-3x3-1024-384",
        "loss_cells": f"interior (the unpadded PDN's grid: {PDN_BORDER_CELLS} border cells left out)",
        "image_size": str(settings.image_size),
        "crop_size": str(settings.crop),
        "steps": str(settings.steps),
        "batch_size": str(settings.batch_size),
        "images_seen": str(settings.steps * settings.batch_size),
        "precision": precision,
        "learning_rate": str(settings.learning_rate),
        "learning_rate_schedule": json.dumps(schedule),
        "weight_decay": str(settings.weight_decay),
        "seed": str(settings.seed),
        "initial_loss": f"{initial_loss:.6f}",
        "final_loss": f"{final_loss:.6f}",
        "seconds": f"{seconds:.1f}",
        "num_images": str(len(paths)),
        "dataset": Path(image_dir).name,
        "device": str(device),
        "versions": json.dumps(versions(), sort_keys=True),
        "dataset_fingerprint": fingerprint,
        "dataset_fingerprint_covers": fingerprint_covers,
    }
    save_teacher(out, teacher.cpu(), metadata)
    state_path(out).unlink(missing_ok=True)
    logger.info("teacher written to %s", out)
    return out
