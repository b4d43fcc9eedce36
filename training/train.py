"""Training the student and the autoencoder against a frozen teacher (EfficientAD, paper Algorithm 1).

One straight loop: sample a training image, jitter its colours for the autoencoder branch, sum the four
losses (hard feature loss + penalty + L_AE + L_STAE), one Adam step on student + autoencoder; the learning
rate drops to 0.1x at 95% of the steps. Afterwards the map quantiles and the default threshold come from
the validation images (held out of train/good), the test set (if any) is evaluated, and the checkpoint is
written. `train()` is those three parts: `prepare` (settings, data, model, optimizer, or a saved state),
`run_loop` (the steps, `train_step` each) and `finish` (statistics, threshold, checkpoint, evaluation).

Resumable: every `save_every` steps, on Ctrl-C, on SIGTERM and at `stop_after_step`, the whole state
(weights, statistics, Adam moments, RNG states, step, settings, losses) is written to ONE file,
`RUN_DIR/train_state.safetensors` (training.run_state); `resume=True` continues from it. All randomness in
the loop comes from one seeded generator plus torch's own RNG (dropout), both saved, so a resumed run on
the CPU repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from efficientad.errors import UserError
from efficientad.files import atomic_write
from efficientad.scores import DEFAULT_THRESHOLD_RULE, default_threshold
from training.augment import random_color_jitter, random_geometric, random_penalty_crops
from training.checkpoint import METADATA_FILE, TENSORS_FILE, ModelConfig, file_sha256, save_checkpoint
from training.data import (
    EvaluationData,
    data_fingerprint,
    load_images,
    load_test_set,
    penalty_image_paths,
    relative_name,
    scan_category,
    split_validation,
)
from training.device import PRECISIONS, autocast
from training.evaluate import evaluate_model, threshold_rates
from training.losses import autoencoder_loss, hard_feature_loss, penalty_loss, student_autoencoder_loss
from training.model import EfficientAD, MapStatistics, imagenet_normalise, normalise_unit_images
from training.networks import PDN, TEACHER_CHANNELS, Autoencoder, ModelSize
from training.recipes import PAPER_IMAGE_SIZE, PAPER_LEARNING_RATE, PAPER_STEPS, RECIPES
from training.run_state import RunState, load_run_state, resumed_settings, save_run_state
from training.signals import sigterm_as_interrupt
from training.statistics import fit_map_quantiles, image_scores, teacher_channel_stats

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.safetensors"  # the one resumable-state file in RUN_DIR
STATE_KIND = "efficientad-train-state"
CURVE_FILE = "curve.json"  # --eval-every: test metrics against steps and training seconds
RANDOM_TEACHER = "random"
RANDOM_TEACHER_NOTE = "random teacher weights: for tests and timing only, not for detecting anomalies"
LR_DECAY_AT = 0.95  # fraction of the steps after which the learning rate is 0.1x
LOG_EVERY = 25  # steps between progress-bar loss updates (each one synchronises the GPU)
CHECKPOINT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
AUGMENTATIONS = ("none", "geometric")
MAX_PENALTY_IMAGES = 1000  # penalty images kept in memory at 2x the input size (a seeded subset if more)
LOSS_NAMES = ("hard", "penalty", "ae", "stae")
MIN_PENALTY_CROP = 48  # px: the unpadded PDN's smallest useful input (a few output cells)


@dataclass
class TrainSettings:
    size: ModelSize = "small"
    steps: int = PAPER_STEPS
    image_size: int = PAPER_IMAGE_SIZE
    teacher: str | None = None  # a teacher .safetensors path, "random", or None for DEFAULT_TEACHER_PATH
    penalty_dir: str | None = None  # any folder of images (e.g. ImageNet samples); None: no penalty term
    device: str = "auto"
    seed: int = 0
    batch_size: int = 1
    learning_rate: float = PAPER_LEARNING_RATE
    weight_decay: float = 1e-5
    validation_fraction: float = 0.1
    precision: str = "auto"  # auto, fp32 or bf16 (autocast of the forward passes; see training.device)
    checkpoint_dtype: str = "float32"  # float16 halves the file (~16 MB for S); stats use the rounded weights
    save_every: int = 1000  # steps between resumable states; 0: only on Ctrl-C and stop_after_step
    augment: str = "none"  # none (the paper) or geometric (flips + zoom of the training images)
    penalty_crop: int | None = None  # px side of the penalty crops; None: the image size (the paper)
    eval_every: int = 0  # steps between test evaluations for the learning curve; 0: at the end only
    recipe: str = "paper"  # the preset these settings started from (RECIPES); explicit settings win

    @classmethod
    def from_recipe(cls, recipe: str = "paper", **overrides: Any) -> TrainSettings:
        """The recipe's settings with `overrides` (explicit settings) applied on top."""
        if recipe not in RECIPES:
            raise UserError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
        return cls(**{**RECIPES[recipe], **overrides, "recipe": recipe})

    def check(self) -> None:
        if self.size not in ("small", "medium"):
            raise UserError(f"--size must be small or medium, got {self.size!r}")
        if self.image_size < 64 or self.image_size % 32:
            raise UserError(f"--image-size must be a multiple of 32 and at least 64, got {self.image_size}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.save_every < 0 or self.eval_every < 0:
            raise UserError(
                f"save_every and eval_every must be >= 0, got {self.save_every}, {self.eval_every}"
            )
        if not 0.0 < self.validation_fraction < 1.0:
            raise UserError(f"validation fraction must be between 0 and 1, got {self.validation_fraction}")
        if self.checkpoint_dtype not in CHECKPOINT_DTYPES:
            choices = ", ".join(CHECKPOINT_DTYPES)
            raise UserError(f"--checkpoint-dtype must be one of {choices}, got {self.checkpoint_dtype!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.learning_rate <= 0:
            raise UserError(f"learning rate must be positive, got {self.learning_rate}")
        if self.augment not in AUGMENTATIONS:
            raise UserError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        crop = self.penalty_crop
        if crop is not None and not (MIN_PENALTY_CROP <= crop <= self.image_size):
            raise UserError(
                f"--penalty-crop must be between {MIN_PENALTY_CROP} and --image-size ({self.image_size}), "
                f"got {crop}"
            )
        if self.recipe not in RECIPES:
            raise UserError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")


# ----------------------------------------------------------------------------- run folder and teacher


def saved_settings(run_dir: Path) -> TrainSettings:
    """The settings of the unfinished run in `run_dir` (from its state file)."""
    return load_saved_state(Path(run_dir)).settings(TrainSettings)


def load_saved_state(run_dir: Path) -> RunState:
    """The resumable state of the unfinished run in `run_dir`."""
    return load_run_state(run_dir / STATE_FILE, kind=STATE_KIND, what="a training state")


def _prepare_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    if resume and force:
        raise UserError("--resume and --force exclude each other")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out must be a folder, but {run_dir} is a file")
    has_checkpoint = (run_dir / METADATA_FILE).exists() or (run_dir / TENSORS_FILE).exists()
    has_state = (run_dir / STATE_FILE).exists()
    if resume:
        if not has_state:
            finished = " (the run finished: its checkpoint is there)" if has_checkpoint else ""
            raise UserError(f"nothing to resume in {run_dir}: no {STATE_FILE}{finished}")
        return
    if force:
        for name in (METADATA_FILE, TENSORS_FILE, STATE_FILE):
            (run_dir / name).unlink(missing_ok=True)
        return
    if has_checkpoint:
        raise UserError(
            f"{run_dir} already holds a checkpoint: pass --force to overwrite it, or choose another --out"
        )
    if has_state:
        raise UserError(
            f"{run_dir} holds an unfinished run ({STATE_FILE}): "
            "pass --resume to continue it or --force to start over"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_teacher_for_training(
    teacher: str | None, size: ModelSize, image_size: int | None = None
) -> tuple[PDN, dict[str, Any]]:
    """The frozen teacher and its record for the checkpoint ("source", "random", "sha256")."""
    from training.teacher_file import DEFAULT_TEACHER_PATH, load_teacher

    if teacher == RANDOM_TEACHER:
        logger.warning("training against a RANDOM teacher: %s", RANDOM_TEACHER_NOTE)
        network = PDN(size=size, out_channels=TEACHER_CHANNELS)
        return network, {
            "source": RANDOM_TEACHER,
            "random": True,
            "sha256": None,
            "note": RANDOM_TEACHER_NOTE,
        }
    if teacher is None:
        if not DEFAULT_TEACHER_PATH.is_file():
            raise UserError(
                f"no teacher given and no default teacher at {DEFAULT_TEACHER_PATH}: run "
                "`efficientad distill IMAGE_DIR --out TEACHER.safetensors` and pass "
                "--teacher TEACHER.safetensors, "
                "or pass --teacher random (for tests and timing only)"
            )
        path = DEFAULT_TEACHER_PATH
    else:
        path = Path(teacher)
        if not path.is_file():
            raise UserError(
                f"teacher file not found: {path} (make one with `efficientad distill`, or --teacher random)"
            )
    network, metadata = load_teacher(path)
    if metadata.get("size") != size:
        raise UserError(
            f"teacher {path} is a PDN-{metadata.get('size')} but --size is {size}: they must match"
        )
    if image_size is not None and metadata.get("image_size") not in (None, str(image_size)):
        logger.warning(
            "teacher %s was distilled at %s px, training runs at %d px: its descriptors are of another "
            "scale (it still works; a teacher distilled at the training size fits best)",
            path, metadata["image_size"], image_size,
        )  # fmt: skip
    record = {"source": str(path), "random": False, "sha256": file_sha256(path), "metadata": metadata}
    return network, record


# ----------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class TrainingImages:
    """What the loop reads and never changes, already on the training device."""

    train: torch.Tensor  # (N, 3, S, S) uint8
    penalty_pool: torch.Tensor | None = None  # (M, 3, 2S, 2S) uint8 natural images for the penalty crops
    train_pool: torch.Tensor | None = None  # (N, 3, 2S, 2S) uint8 for --augment geometric
    teacher_features: torch.Tensor | None = None  # (N, 384, h, w) normalised teacher output on `train`
    penalty_crop: int | None = None  # px side of the penalty crops (None: the training image size)

    def to(self, device: torch.device) -> TrainingImages:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return replace(
            self,
            train=move(self.train),
            penalty_pool=move(self.penalty_pool),
            train_pool=move(self.train_pool),
            teacher_features=move(self.teacher_features),
        )

    def draw_batch(
        self, batch_size: int, image_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, S, S) float in [0, 1]: training images drawn with replacement (and augmented, if pooled),
        and their cached teacher features (B, 384, h, w) where the images are used as they are."""
        draws = torch.randint(0, self.train.shape[0], (batch_size,), generator=generator).tolist()
        if self.train_pool is None:
            batch = (
                torch.stack([self.train[index] for index in draws]).float() / 255.0
            )  # CPU indices: no sync
            cached = self.teacher_features
            return batch, None if cached is None else torch.stack([cached[index] for index in draws])
        picked = torch.stack([self.train_pool[index] for index in draws])  # (B, 3, 2S, 2S)
        return random_geometric(picked, image_size, generator), None  # (B, 3, S, S)


@torch.no_grad()
def cached_teacher_features(
    model: EfficientAD, images: torch.Tensor, device: torch.device, *, batch_size: int = 16
) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> (N, 384, h, w) float32 normalised teacher features, computed once (fp32)."""
    features = [
        model.teacher_features(imagenet_normalise(images[start : start + batch_size].to(device)))
        for start in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(features).float()


def new_optimizer(model: EfficientAD, learning_rate: float, weight_decay: float) -> torch.optim.Adam:
    """Adam over the student and the autoencoder (the teacher stays frozen)."""
    parameters = [*model.student.parameters(), *model.autoencoder.parameters()]
    return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay)


def train_step(
    model: EfficientAD,
    batch: torch.Tensor,
    images: TrainingImages,
    generator: torch.Generator,
    precision: str = "fp32",
    teacher_st: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The four losses (fp32) for one batch of training images, (B, 3, S, S) float in [0, 1].

    `teacher_st`: the batch's cached teacher features (B, 384, h, w), or None to compute them. The student
    sees the plain images, the jittered ones and full-size penalty crops in one forward pass (measured on
    2 CPU cores: ~20% less time per step than three passes); smaller penalty crops get a pass of their own.
    """
    channels, count = TEACHER_CHANNELS, batch.shape[0]
    images_st = normalise_unit_images(batch)  # (B, 3, S, S)
    images_ae = normalise_unit_images(random_color_jitter(batch, generator))  # (B, 3, S, S)
    student_inputs = [images_st, images_ae]
    penalty_images = None
    if images.penalty_pool is not None:
        side = images.penalty_crop or batch.shape[-1]
        crops = random_penalty_crops(images.penalty_pool, count, side, generator)  # (B, 3, P, P)
        penalty_images = normalise_unit_images(crops)
        if side == batch.shape[-1]:
            student_inputs.append(penalty_images)
            penalty_images = None
    with autocast(batch.device, precision):
        with torch.no_grad():
            if teacher_st is None:
                teacher_st = model.teacher_features(images_st).float()  # (B, 384, h, w)
            teacher_ae = model.teacher_features(images_ae).float()
        outputs = model.student(torch.cat(student_inputs)).float()  # (2B or 3B, 768, h, w)
        autoencoder_output = model.autoencoder(images_ae).float()  # (B, 384, h, w)
        if penalty_images is not None:
            on_penalty = model.student(penalty_images)[:, :channels].float()  # (B, 384, p, p)
        elif images.penalty_pool is not None:
            on_penalty = outputs[2 * count :, :channels]  # (B, 384, h, w)
    student_st, student_ae = outputs[:count, :channels], outputs[count : 2 * count, channels:]
    losses = {"hard": hard_feature_loss(teacher_st, student_st)}
    if images.penalty_pool is not None:
        losses["penalty"] = penalty_loss(on_penalty)
    else:
        losses["penalty"] = torch.zeros((), device=batch.device)
    losses["ae"] = autoencoder_loss(teacher_ae, autoencoder_output)
    losses["stae"] = student_autoencoder_loss(autoencoder_output, student_ae)
    return losses


def optimizer_step(optimizer: torch.optim.Optimizer, losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum the losses, one Adam step; returns the (detached) total."""
    total = losses["hard"] + losses["penalty"] + losses["ae"] + losses["stae"]
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return total.detach()


def round_weights(module: nn.Module, dtype: torch.dtype) -> None:
    """Round every parameter and buffer to `dtype` and back (in place): the values a checkpoint in that
    dtype holds, so the statistics and threshold computed next fit the file exactly."""
    if dtype == torch.float32:
        return
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))


def learning_rate_at(step: int, settings: TrainSettings) -> float:
    """The paper's schedule: the base rate, then 0.1x from step int(0.95 * steps) on (0-based steps)."""
    return settings.learning_rate * (0.1 if step >= int(LR_DECAY_AT * settings.steps) else 1.0)


# ----------------------------------------------------------------------------- prepare, loop, finish


@dataclass
class TrainingRun:
    """A prepared run: everything the loop reads and changes, and what `finish` needs afterwards."""

    run_dir: Path
    settings: TrainSettings
    device: torch.device
    precision: str
    model: EfficientAD  # teacher frozen, its channel statistics already in the buffers
    optimizer: torch.optim.Adam
    generator: torch.Generator
    images: TrainingImages  # on the device
    validation_images: torch.Tensor  # (V, 3, S, S) uint8, on the CPU
    test_set: EvaluationData | None
    records: dict[str, Any]  # teacher, data and penalty records, for the state and the checkpoint
    step: int = 0
    recent_losses: dict[str, float] | None = None
    seconds: float = 0.0  # training time so far, all sessions, evaluations left out
    started: float = 0.0  # perf_counter at prepare
    curve: list[dict[str, Any]] = field(default_factory=list)  # test metrics against steps and seconds

    def save_state(self) -> None:
        save_run_state(
            self.run_dir / STATE_FILE,
            kind=STATE_KIND,
            document={
                "step": self.step,
                "settings": asdict(self.settings),
                "recent_losses": self.recent_losses or {},
                "seconds": self.seconds,
                "curve": self.curve,
                **self.records,
            },
            modules={"model": self.model},
            optimizer=self.optimizer,
            tensors=_rng_tensors(self.generator, self.device),
        )


def _rng_tensors(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    tensors = {"rng.generator": generator.get_state(), "rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def _restore_rng(state: RunState, generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(state.tensors["rng.generator"])
    torch.set_rng_state(state.tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in state.tensors:
        torch.cuda.set_rng_state(state.tensors["rng.cuda"], device)


def _load_data(data_dir: Path, settings: TrainSettings) -> tuple[TrainingImages, torch.Tensor, Any, dict]:
    """(training images, validation images, test set or None, data and penalty records)."""
    category = scan_category(Path(data_dir))
    train_paths, validation_paths = split_validation(
        category.train_images, settings.validation_fraction, settings.seed
    )
    train = load_images(train_paths, settings.image_size, desc="loading training")  # (N, 3, S, S)
    train_pool = (  # (N, 3, 2S, 2S): zoomed windows are downsampled from it
        load_images(train_paths, 2 * settings.image_size, desc="loading training at 2x")
        if settings.augment == "geometric"
        else None
    )
    validation = load_images(validation_paths, settings.image_size, desc="loading validation")
    test_set = load_test_set(category, settings.image_size) if category.has_test else None
    penalty_pool, penalty_record = None, None
    if settings.penalty_dir is not None:
        penalty_paths, available = penalty_image_paths(
            Path(settings.penalty_dir), MAX_PENALTY_IMAGES, settings.seed
        )
        penalty_pool = load_images(penalty_paths, 2 * settings.image_size, desc="loading penalty images")
        penalty_record = {
            "dir": str(settings.penalty_dir),
            "images": len(penalty_paths),
            "available": available,
        }
    else:
        logger.warning(
            "no penalty folder given: training without the penalty term (the paper uses ImageNet images)"
        )
    records = {
        "data": {
            "dir": str(category.root.resolve()),
            "fingerprint": data_fingerprint(category.root, category.train_images),
            "train_images": len(train_paths),
            "validation_images": [relative_name(path, category.root) for path in validation_paths],
            "validation_fraction": settings.validation_fraction,
            "seed": settings.seed,
        },
        "penalty": penalty_record,
    }
    images = TrainingImages(train, penalty_pool, train_pool, penalty_crop=settings.penalty_crop)
    return images, validation, test_set, records


def to_training_device(model: EfficientAD, device: torch.device) -> EfficientAD:
    """Move the model to `device`; on a CPU also into channels-last (NHWC) layout, where oneDNN's
    convolutions are faster: a fast-recipe step 0.255 -> 0.205 s (bf16, 2 threads, AVX512-BF16 EPYC).
    Layout changes no value an elementwise op sees, so resumed Adam moments in NCHW still fit."""
    model.to(device)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def prepare(
    data_dir: Path,
    out_dir: Path,
    settings: TrainSettings | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    **overrides: Any,
) -> TrainingRun:
    """Check the run folder and settings, load the teacher and the data, build the model and optimizer (or
    restore them from the saved state); every input error surfaces here, before any training."""
    from training.device import resolve_device, resolve_precision

    run_dir = Path(out_dir)
    _prepare_run_dir(run_dir, resume=resume, force=force)
    state = load_saved_state(run_dir) if resume else None
    if state is not None:
        given = {**(asdict(settings) if settings is not None else {}), **overrides}
        settings = resumed_settings(state.settings(TrainSettings), given, what=f"the run in {run_dir}")
        if settings.steps < state.step:
            raise UserError(f"--steps {settings.steps} is below the step the run reached ({state.step})")
    elif settings is None:
        settings = TrainSettings.from_recipe(**overrides)
    else:
        settings = replace(settings, **overrides)
    settings.check()
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    logger.info("training on %s in %s", device, precision)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    _seed_everything(settings.seed)
    started = time.perf_counter()

    if state is not None:
        teacher = PDN(size=settings.size, out_channels=TEACHER_CHANNELS)
        teacher_record = state.document["teacher"]
    else:
        teacher, teacher_record = load_teacher_for_training(
            settings.teacher, settings.size, settings.image_size
        )
        settings = replace(settings, teacher=teacher_record["source"])
    images, validation, test_set, records = _load_data(Path(data_dir), settings)
    if state is not None and state.document["data"]["fingerprint"] != records["data"]["fingerprint"]:
        raise UserError(
            f"the training images in {Path(data_dir) / 'train' / 'good'} changed since the run in {run_dir} "
            "started (data fingerprint differs): restore them or start a new run"
        )
    records = {"teacher": teacher_record, **records}

    model = EfficientAD(
        teacher,
        PDN(size=settings.size, out_channels=2 * TEACHER_CHANNELS),
        Autoencoder(out_channels=TEACHER_CHANNELS, image_size=settings.image_size),
        image_size=settings.image_size,
    )
    optimizer = new_optimizer(model, settings.learning_rate, settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    run = TrainingRun(
        run_dir, settings, device, precision, model, optimizer, generator, images.to(device), validation,
        test_set, records, started=started,
    )  # fmt: skip
    if state is not None:
        state.restore_module(model, "model")
        _restore_rng(state, generator, device)
        run.step, run.seconds = state.step, float(state.document.get("seconds", 0.0))
        run.recent_losses = dict(state.document.get("recent_losses", {}))
        run.curve = list(state.document.get("curve", []))
        logger.info("resuming %s at step %d of %d", run_dir, run.step, settings.steps)
    to_training_device(model, device)
    model.teacher.eval()
    for parameter in model.teacher.parameters():
        parameter.requires_grad_(False)
    if state is not None:
        state.restore_optimizer(optimizer)
    else:
        mean, std = teacher_channel_stats(model.teacher, images.train, device)  # (384,) each
        model.set_statistics(replace(MapStatistics.identity(), teacher_mean=mean, teacher_std=std))
    if images.train_pool is None:  # the images are used as they are: their teacher features never change
        run.images = replace(
            run.images, teacher_features=cached_teacher_features(model, images.train, device)
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run


def run_loop(run: TrainingRun, end_step: int) -> None:
    """Steps run.step .. end_step - 1; `run` is updated after each step (so an interrupt saves it)."""
    model, settings = run.model, run.settings
    model.student.train()
    model.autoencoder.train()
    totals: torch.Tensor | None = None
    window = 0
    seconds_before, session_started = run.seconds, time.perf_counter()
    progress = tqdm(
        total=settings.steps,
        initial=run.step,
        desc="training",
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not 10 per s
    )
    try:
        while run.step < end_step:
            for group in run.optimizer.param_groups:
                group["lr"] = learning_rate_at(run.step, settings)
            batch, teacher_st = run.images.draw_batch(settings.batch_size, settings.image_size, run.generator)
            losses = train_step(model, batch, run.images, run.generator, run.precision, teacher_st)
            total = optimizer_step(run.optimizer, losses)
            run.step += 1
            progress.update(1)
            values = torch.stack([total, *(loss.detach() for loss in losses.values())])
            totals = values if totals is None else totals + values
            window += 1
            if window == LOG_EVERY or run.step == end_step:
                means = (totals / window).tolist()  # one GPU sync per LOG_EVERY steps
                run.recent_losses = dict(zip(("total", *losses.keys()), means, strict=True))
                if not np.isfinite(means[0]):
                    raise RuntimeError(
                        f"the training loss became {means[0]} at step {run.step}: try a lower learning rate"
                    )
                progress.set_postfix({name: f"{value:.4f}" for name, value in run.recent_losses.items()})
                totals, window = None, 0
            run.seconds = seconds_before + time.perf_counter() - session_started
            if settings.eval_every and run.step % settings.eval_every == 0 and run.step < settings.steps:
                began = time.perf_counter()
                record_curve_point(run)
                session_started += time.perf_counter() - began  # evaluation is not training time
                model.student.train()
                model.autoencoder.train()
            if settings.save_every and run.step % settings.save_every == 0 and run.step < settings.steps:
                run.save_state()
    finally:
        progress.close()


def record_curve_point(run: TrainingRun) -> dict[str, Any] | None:
    """Test metrics of the model as it is now (map quantiles refit on the validation images, the default
    threshold from them), appended to `run.curve` and written to RUN_DIR/curve.json; None without test set."""
    if run.test_set is None:
        return None
    model, device = run.model, run.device
    model.eval()
    fit_map_quantiles(model, run.validation_images, device)
    threshold = default_threshold(image_scores(model, run.validation_images, device))
    return _curve_point(run, evaluate_model(model, run.test_set, device), threshold)


def _curve_point(run: TrainingRun, metrics: dict[str, Any], threshold: float) -> dict[str, Any]:
    """One learning-curve point from `metrics` (training.evaluate) at `threshold`, appended to run.curve."""
    assert run.test_set is not None
    point = {
        "step": run.step,
        "seconds": round(run.seconds, 1),
        **{name: metrics["overall"][name] for name in ("image_auroc", "pixel_auroc", "au_pro")},
        **threshold_rates(run.test_set.labels, metrics["scores"], threshold),
    }
    run.curve.append(point)
    text = json.dumps(run.curve, indent=1)
    atomic_write(run.run_dir / CURVE_FILE, lambda temporary: temporary.write_text(text + "\n"))
    logger.info("step %d: image AUROC %s", run.step, point["image_auroc"])
    return point


def finish(run: TrainingRun) -> Path:
    """Statistics, threshold, checkpoint and evaluation, all on the weights as the checkpoint stores them."""
    model, settings, device = run.model, run.settings, run.device
    model.eval()
    storage_dtype = CHECKPOINT_DTYPES[settings.checkpoint_dtype]
    for network in (model.teacher, model.student, model.autoencoder):
        round_weights(network, storage_dtype)
    stats = fit_map_quantiles(model, run.validation_images, device)
    validation_scores = image_scores(model, run.validation_images, device)
    validation_names = run.records["data"]["validation_images"]
    metadata: dict[str, Any] = {
        "threshold": default_threshold(validation_scores),
        "threshold_rule": DEFAULT_THRESHOLD_RULE,
        "validation_scores": {
            "min": float(validation_scores.min()),
            "median": float(np.median(validation_scores)),
            "max": float(validation_scores.max()),
            "values": dict(zip(validation_names, map(float, validation_scores), strict=True)),
        },
        "teacher": run.records["teacher"],
        "training": {
            **asdict(settings),
            "device_used": str(device),
            "precision_used": run.precision,
            "steps_completed": run.step,
            "final_losses": run.recent_losses,
            "seconds": run.seconds,
            "wall_seconds_last_session": time.perf_counter() - run.started,
            "penalty": run.records["penalty"],
        },
        "data": run.records["data"],
        "metrics": None,
    }
    config = ModelConfig(size=settings.size, image_size=settings.image_size)
    networks = {"teacher": model.teacher, "student": model.student, "autoencoder": model.autoencoder}

    def write() -> None:
        save_checkpoint(
            run.run_dir, config=config, **networks, stats=stats, metadata=metadata, dtype=storage_dtype
        )

    write()
    if run.test_set is not None:
        metrics = evaluate_model(model, run.test_set, device)
        rates = threshold_rates(run.test_set.labels, metrics["scores"], metadata["threshold"])
        _curve_point(run, metrics, metadata["threshold"])
        metadata["metrics"] = {**metrics, **rates, "curve": run.curve}  # test scores per image kept
        write()
        logger.info("test metrics: %s", json.dumps(metrics["overall"]))
    (run.run_dir / STATE_FILE).unlink(missing_ok=True)
    logger.info("checkpoint written to %s", run.run_dir / METADATA_FILE)
    return run.run_dir


def train(
    data_dir: Path,
    out_dir: Path,
    settings: TrainSettings | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    stop_after_step: int | None = None,
    **overrides: Any,
) -> Path:
    """Train on DATA_DIR (MVTec layout) and write the checkpoint into OUT_DIR; returns OUT_DIR.

    `settings` and `overrides` (TrainSettings fields): the run's settings. `resume`: continue the unfinished
    run in OUT_DIR with its saved settings; what is asked for again must match them, except the settings in
    training.run_state.RESUME_MAY_CHANGE. `force`: replace a finished or unfinished run in OUT_DIR.
    `stop_after_step`: save a resumable state after that step and return without a checkpoint.
    """
    run = prepare(data_dir, out_dir, settings, resume=resume, force=force, **overrides)
    end_step = run.settings.steps if stop_after_step is None else min(run.settings.steps, stop_after_step)
    try:
        with sigterm_as_interrupt():  # `kill` or a scheduler's stop saves a resumable state, as Ctrl-C
            run_loop(run, end_step)
    except KeyboardInterrupt:
        run.save_state()
        logger.warning("interrupted at step %d: continue with --resume", run.step)
        raise
    if run.step < run.settings.steps:
        run.save_state()
        logger.info("stopped after step %d of %d: continue with --resume", run.step, run.settings.steps)
        return run.run_dir
    return finish(run)
