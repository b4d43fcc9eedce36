"""Training speed: seconds per step, steps/s and images/s of a distillation step and a training step.

Each step is the one the training code runs, built from its own parts:
- `distill`: `training.distill`'s step: the padded PDN-S teacher on a (B, 3, crop, crop) uint8 batch,
  ImageNet-normalised (`training.model.imagenet_normalise`), under `training.device.autocast`;
  `F.mse_loss` to (B, 384, crop/4, crop/4) float32 targets; one Adam step (lr 1e-4, weight decay 1e-5).
  The distillation caches the backbone's targets (computed once per image), so the timed step is the PDN
  step on a ready batch (its host->device copy included); the batch's assembly from the cache is not timed.
- `backbone`: what that cache saves: `training.distill.backbone_features` (EfficientNet-Lite0, no grad)
  on (N, 3, 2S, 2S) images, N = 1 by default as the distillation computes its targets one image at a time.
- `train`: `training.train.train_step` (teacher, student on plain + jittered images + penalty crops,
  autoencoder, the four losses) + `optimizer_step` (sum, zero_grad, backward, Adam step), as the loop does.

Weights and images are random: a step's time does not depend on their values. Precisions: fp32 always,
bf16 (autocast) only where the device computes it natively (`resolve_precision("auto", device)`); on a CPU
without AVX512-BF16/AMX oneDNN emulates bf16 and a step is ~25x slower, so that row is skipped and noted.
Each case: untimed warm-up steps, then timed steps, each on its own (`time.perf_counter`; on CUDA a
synchronise before the clock starts and after the step).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.environment import cpu_name
from benchmarks.timing import percentile

logger = logging.getLogger(__name__)

TEACHER_CHANNELS = 384
DISTILL_LEARNING_RATE, DISTILL_WEIGHT_DECAY = 1e-4, 1e-5  # training.distill.DistillSettings defaults
TRAIN_LEARNING_RATE, TRAIN_WEIGHT_DECAY = 1e-4, 1e-5  # training.train.TrainSettings defaults
TRAIN_POOL_IMAGES = 8  # random training images a step draws its batch from
PENALTY_POOL_IMAGES = 8  # random penalty images (at 2S) the penalty crops come from
MIN_TIMED_STEPS = 2  # a case past its time budget still gets this many timed steps
BACKBONE = "efficientnet-lite0"

DISTILL_NOTE = (
    "distill: PDN step only (forward + MSE + backward + Adam on a ready batch, host->device copy "
    "included): the distillation caches the backbone targets, computed once per image (see the "
    "backbone rows)"
)
BACKBONE_NOTE = (
    f"backbone: {BACKBONE} target features (no grad) on 2S x 2S inputs for a PDN at S px; images/s is "
    "per image, i.e. the cost the target cache saves per image after its first use"
)
TRAIN_NOTE = (
    "train: training.train.train_step (teacher; student on plain and jittered images{penalty}; "
    "autoencoder; 4 losses) + backward + Adam step"
)
RANDOM_NOTE = "random weights and random uint8 images: a step's time does not depend on their values"


@dataclass(frozen=True)
class TrainingSpeedRow:
    """One timed case: `batch_size` images per step, `steps` timed steps after `warmup` untimed ones."""

    stage: str  # "distill", "train" or "backbone"
    device: str  # e.g. "NVIDIA H200" or "AMD EPYC 7B13 (2 cores)"
    precision: str  # "fp32" or "bf16"
    image_size: int  # S: the PDN's input side (the backbone sees 2S)
    crop: int | None  # distill: side of the PDN's random crops; train: of the penalty crops (None: whole)
    batch_size: int
    median_s: float  # seconds per step
    p90_s: float
    steps_per_s: float  # 1 / median_s
    images_per_s: float  # batch_size / median_s
    steps: int  # timed steps
    warmup: int  # untimed steps before them
    notes: str = ""
    gflop_per_step: float | None = None  # counted by torch's FlopCounterMode on one step
    gflop_per_s: float | None = None  # gflop_per_step / median_s

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingSpeed:
    """The rows for one device, and what was skipped or failed, and why."""

    device: str
    rows: list[TrainingSpeedRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "rows": [row.as_dict() for row in self.rows], "notes": self.notes}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with its core count (as `environment.describe_device`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count() or 1} cores)"


def precisions_for(device: torch.device) -> tuple[list[str], str | None]:
    """(precisions to time, why bf16 is not among them or None): bf16 only where it is native."""
    from training.device import resolve_precision

    if resolve_precision("auto", device) == "bf16":
        return ["fp32", "bf16"], None
    if device.type == "cuda":
        return ["fp32"], "bf16 skipped: torch reports no bf16 support on this GPU"
    return ["fp32"], (
        "bf16 skipped: this CPU has no AVX512-BF16/AMX, so oneDNN emulates bf16 and a step is ~25x slower "
        "than fp32 (see training.device)"
    )


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int,
    steps: int,
    budget_s: float | None = None,
) -> list[float]:
    """Seconds per step: `warmup` untimed steps, then up to `steps` timed ones (fewer, but at least
    MIN_TIMED_STEPS, once `budget_s` seconds of timed steps have passed)."""
    for _ in range(warmup):
        step()
    _synchronise(device)
    started = time.perf_counter()
    seconds: list[float] = []
    for _ in range(steps):
        if (
            budget_s is not None
            and len(seconds) >= MIN_TIMED_STEPS
            and time.perf_counter() - started > budget_s
        ):
            break
        _synchronise(device)
        start = time.perf_counter()
        step()
        _synchronise(device)
        seconds.append(time.perf_counter() - start)
    return seconds


# ---------------------------------------------------------------- the steps


def distill_step(
    device: torch.device, precision: str, *, image_size: int, crop: int | None, batch_size: int, seed: int = 0
) -> Callable[[], None]:
    """One distillation step (the PDN's; targets come from the cache) on random images and targets."""
    from training.distill import distill_step
    from training.networks import PDN, pdn_output_size

    side = crop or image_size
    generator = torch.Generator().manual_seed(seed)
    teacher = PDN(size="small", out_channels=TEACHER_CHANNELS, padding=True).to(device).train()
    optimizer = torch.optim.Adam(
        teacher.parameters(), lr=DISTILL_LEARNING_RATE, weight_decay=DISTILL_WEIGHT_DECAY
    )
    images = torch.randint(0, 256, (batch_size, 3, side, side), dtype=torch.uint8, generator=generator)
    grid = pdn_output_size(side, padding=True)  # crop / 4
    targets = torch.randn(batch_size, TEACHER_CHANNELS, grid, grid, generator=generator)  # float32, CPU

    def step() -> None:
        distill_step(teacher, optimizer, images, targets, device, precision)

    return step


def backbone_step(
    device: torch.device, precision: str, *, image_size: int, batch_size: int, seed: int = 0
) -> Callable[[], None]:
    """The backbone's target features for `batch_size` random images at twice `image_size`."""
    from training.backbones import build_backbone
    from training.distill import backbone_features

    backbone = build_backbone(BACKBONE, image_size=image_size, device=device)
    side = backbone.input_size  # 2S
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, 3, side, side), dtype=torch.uint8, generator=generator)
    images = images.to(device)  # (N, 3, 2S, 2S) uint8

    def step() -> None:
        backbone_features(backbone, images, precision)  # (N, 384, S/4, S/4) float32

    return step


def train_step(
    device: torch.device,
    precision: str,
    *,
    image_size: int,
    batch_size: int,
    penalty: bool,
    penalty_crop: int | None = None,
    seed: int = 0,
) -> Callable[[], None]:
    """One training step (student + autoencoder against a frozen teacher) on random images, through the
    training loop's own functions: `TrainingImages.draw_batch`, `train_step`, `optimizer_step`, with the
    teacher's features of the (unaugmented) training images cached as the loop caches them."""
    from training.model import EfficientAD
    from training.networks import PDN, Autoencoder
    from training.train import (
        TrainingImages,
        cached_teacher_features,
        new_optimizer,
        optimizer_step,
        to_training_device,
    )
    from training.train import train_step as training_step

    generator = torch.Generator().manual_seed(seed)
    model = EfficientAD(
        PDN(size="small", out_channels=TEACHER_CHANNELS),
        PDN(size="small", out_channels=2 * TEACHER_CHANNELS),
        Autoencoder(out_channels=TEACHER_CHANNELS, image_size=image_size),
        image_size=image_size,
    )
    to_training_device(model, device)  # as training places it (channels-last on a CPU)
    model.student.train()
    model.autoencoder.train()
    model.teacher.eval().requires_grad_(False)
    optimizer = new_optimizer(model, TRAIN_LEARNING_RATE, TRAIN_WEIGHT_DECAY)
    side = image_size
    images = TrainingImages(
        train=torch.randint(
            0, 256, (TRAIN_POOL_IMAGES, 3, side, side), dtype=torch.uint8, generator=generator
        ),
        penalty_pool=torch.randint(
            0, 256, (PENALTY_POOL_IMAGES, 3, 2 * side, 2 * side), dtype=torch.uint8, generator=generator
        )
        if penalty
        else None,  # (M, 3, 2S, 2S)
        penalty_crop=penalty_crop,
    ).to(device)
    images = replace(images, teacher_features=cached_teacher_features(model, images.train, device))

    def step() -> None:
        batch, teacher_st = images.draw_batch(batch_size, image_size, generator)  # (B, 3, S, S)
        optimizer_step(optimizer, training_step(model, batch, images, generator, precision, teacher_st))

    return step


def count_flops(step: Callable[[], None]) -> int:
    """Floating-point operations of one call of `step` (torch's FlopCounterMode: convolutions and matrix
    products, forward and backward; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------- all cases


@dataclass(frozen=True)
class _Case:
    stage: str  # "distill", "backbone" or "train"
    image_size: int
    crop: int | None
    batch_size: int
    notes: str

    def label(self, precision: str) -> str:
        crop = f" (crop {self.crop})" if self.crop else ""
        return f"{self.stage} {precision} {self.image_size} px{crop}"


def _row(case: _Case, device: str, precision: str, seconds: Sequence[float], warmup: int) -> TrainingSpeedRow:
    median = statistics.median(seconds)
    return TrainingSpeedRow(
        stage=case.stage,
        device=device,
        precision=precision,
        image_size=case.image_size,
        crop=case.crop,
        batch_size=case.batch_size,
        median_s=median,
        p90_s=percentile(seconds, 90),
        steps_per_s=1.0 / median if median > 0 else math.inf,
        images_per_s=case.batch_size / median if median > 0 else math.inf,
        steps=len(seconds),
        warmup=warmup,
        notes=case.notes,
    )


def _make_step(case: _Case, device: torch.device, precision: str, *, penalty: bool) -> Callable[[], None]:
    if case.stage == "distill":
        return distill_step(
            device, precision, image_size=case.image_size, crop=case.crop, batch_size=case.batch_size
        )
    if case.stage == "backbone":
        return backbone_step(device, precision, image_size=case.image_size, batch_size=case.batch_size)
    return train_step(
        device,
        precision,
        image_size=case.image_size,
        batch_size=case.batch_size,
        penalty=penalty,
        penalty_crop=case.crop,
    )


def time_training(
    device: torch.device | str = "cpu",
    *,
    train_sizes: Sequence[int] = (128, 256),
    train_penalty_crops: Sequence[tuple[int, int]] = ((128, 64),),
    train_batch: int = 1,
    distill_cases: Sequence[tuple[int, int | None]] = ((256, None), (256, 128), (128, 96)),
    distill_batch: int = 8,
    backbone: bool = True,
    backbone_batch: int = 1,
    penalty: bool = True,
    warmup: int = 2,
    steps: int = 5,
    budget_s: float | None = None,
) -> TrainingSpeed:
    """Distill, backbone and train rows per precision on `device`; `distill_cases` are (image, crop or
    None) pairs, the backbone is timed once per distinct distill image size. A case that fails (e.g. out
    of memory) is noted and skipped; the others still run."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    device = torch.device(device)
    name = device_name(device)
    result = TrainingSpeed(device=name, notes=[RANDOM_NOTE])
    precisions, skipped = precisions_for(device)
    if skipped:
        result.notes.append(skipped)
    if device.type == "cpu":
        result.notes.append(f"CPU: torch intra-op threads {torch.get_num_threads()}")
    else:
        result.notes.append(
            "CUDA: cudnn.benchmark on (as in training); a synchronise after every timed step (the training "
            "loop syncs every 25 steps), so each step includes its launch gaps"
        )
    train_note = TRAIN_NOTE.format(penalty=" + penalty crops" if penalty else "")
    cases = [_Case("distill", size, crop, distill_batch, DISTILL_NOTE) for size, crop in distill_cases]
    if backbone:
        sizes = sorted({size for size, _ in distill_cases})
        cases += [_Case("backbone", size, None, backbone_batch, BACKBONE_NOTE) for size in sizes]
    cases += [_Case("train", size, None, train_batch, train_note) for size in train_sizes]
    if penalty:  # smaller penalty crops (--penalty-crop, the fast recipe)
        cases += [_Case("train", size, crop, train_batch, train_note) for size, crop in train_penalty_crops]
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes, as training.train sets it
    try:
        runs = [(case, precision) for case in cases for precision in precisions]
        for case, precision in tqdm(runs, desc="training speed", unit="case"):
            label = case.label(precision)
            try:
                step = _make_step(case, device, precision, penalty=penalty)
                flops = count_flops(step)  # also the first warm-up step
                seconds = time_steps(step, device, warmup=warmup, steps=steps, budget_s=budget_s)
                del step  # free the case's networks before the next case builds its own
            except Exception as error:  # e.g. out of memory, or the backbone's weights missing
                logger.warning("training speed: %s failed: %s", label, error)
                result.notes.append(f"{label} failed: {type(error).__name__}: {error}"[:300])
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            row = _row(case, name, precision, seconds, warmup)
            row = replace(row, gflop_per_step=flops / 1e9, gflop_per_s=flops / 1e9 / row.median_s)
            logger.info(
                "training speed: %s: %.4f s/step, %.1f images/s", label, row.median_s, row.images_per_s
            )
            result.rows.append(row)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return result
