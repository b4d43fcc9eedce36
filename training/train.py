"""Training the student and the autoencoder against a frozen teacher (EfficientAD, paper Algorithm 1).

One straight loop: sample a training image, jitter its colours for the autoencoder branch, sum the four
losses (hard feature loss + penalty + L_AE + L_STAE), one Adam step on student + autoencoder; the learning
rate drops to 0.1x at 95% of the steps. Afterwards the map quantiles and the default threshold come from
the validation images (held out of train/good), the test set (if any) is evaluated, and the checkpoint is
written.

Resumable: every `save_every` steps, on Ctrl-C and at `stop_after_step`, `RUN_DIR/train_state.safetensors`
(weights, Adam moments, RNG states; no pickle) and `RUN_DIR/train_state.json` (step, settings, losses) are
written; `resume=True` continues from them. All randomness in the loop comes from one seeded generator
plus torch's own RNG (dropout), both saved, so a resumed run on the CPU repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from efficientad.errors import UserError
from efficientad.files import atomic_write
from training.augment import random_color_jitter, random_geometric, random_penalty_crops
from training.checkpoint import (
    METADATA_FILE,
    TENSORS_FILE,
    CheckpointError,
    ModelConfig,
    file_sha256,
    save_checkpoint,
)
from training.data import (
    data_fingerprint,
    load_images,
    load_test_set,
    penalty_image_paths,
    relative_name,
    scan_category,
    split_validation,
)
from training.device import PRECISIONS, autocast
from training.evaluate import evaluate_networks
from training.losses import autoencoder_loss, hard_feature_loss, penalty_loss, student_autoencoder_loss
from training.networks import IMAGENET_MEAN, IMAGENET_STD, PDN, TEACHER_CHANNELS, Autoencoder, ModelSize
from training.signals import sigterm_as_interrupt
from training.statistics import (
    THRESHOLD_RULE,
    default_threshold,
    image_scores,
    map_quantiles,
    teacher_channel_stats,
)

logger = logging.getLogger(__name__)

STATE_TENSORS_FILE = "train_state.safetensors"
STATE_FILE = "train_state.json"
STATE_FORMAT = "efficientad-train-state"
RANDOM_TEACHER = "random"
RANDOM_TEACHER_NOTE = "random teacher weights: for tests and timing only, not for detecting anomalies"
LR_DECAY_AT = 0.95  # fraction of the steps after which the learning rate is 0.1x
LOG_EVERY = 25  # steps between progress-bar loss updates (each one synchronises the GPU)
CHECKPOINT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
AUGMENTATIONS = ("none", "geometric")
MAX_PENALTY_IMAGES = 1000  # penalty images kept in memory at 2x the input size (a seeded subset if more)


@dataclass
class TrainSettings:
    size: ModelSize = "small"
    steps: int = 70_000
    image_size: int = 256
    teacher: str | None = None  # a teacher .safetensors path, "random", or None for DEFAULT_TEACHER_PATH
    penalty_dir: str | None = None  # any folder of images (e.g. ImageNet samples); None: no penalty term
    device: str = "auto"
    seed: int = 0
    batch_size: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 1e-5
    validation_fraction: float = 0.1
    precision: str = "auto"  # auto, fp32 or bf16 (autocast of the forward passes; see training.device)
    checkpoint_dtype: str = "float32"  # float16 halves the file (~16 MB for S); stats use the rounded weights
    save_every: int = 1000  # steps between resumable states; 0: only on Ctrl-C and stop_after_step
    augment: str = "none"  # none (the paper) or geometric (flips + zoom of the training images)

    def check(self) -> None:
        if self.size not in ("small", "medium"):
            raise UserError(f"--size must be small or medium, got {self.size!r}")
        if self.image_size < 64 or self.image_size % 32:
            raise UserError(f"--image-size must be a multiple of 32 and at least 64, got {self.image_size}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.save_every < 0:
            raise UserError(f"save_every must be >= 0, got {self.save_every}")
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


# ----------------------------------------------------------------------------- run folder and saved state


def saved_settings(run_dir: Path) -> TrainSettings:
    """The settings of the unfinished run in `run_dir` (from train_state.json)."""
    document = _read_state_document(Path(run_dir))
    known = {field.name for field in fields(TrainSettings)}
    return TrainSettings(**{key: value for key, value in document["settings"].items() if key in known})


def _read_state_document(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise UserError(f"nothing to resume in {run_dir}: {STATE_FILE} not found")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"training state is not valid JSON: {path} ({error})") from None
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise CheckpointError(f"not an EfficientAD training state (format field missing or foreign): {path}")
    return document


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
        for name in (METADATA_FILE, TENSORS_FILE, STATE_FILE, STATE_TENSORS_FILE):
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


@dataclass
class _LoopState:
    """Everything the loop changes, saved for a resume."""

    step: int
    student: PDN
    autoencoder: Autoencoder
    optimizer: torch.optim.Adam
    generator: torch.Generator
    recent_losses: dict[str, float]
    seconds: float


def _save_state(
    run_dir: Path,
    loop: _LoopState,
    *,
    settings: TrainSettings,
    teacher: PDN,
    teacher_mean: torch.Tensor,
    teacher_std: torch.Tensor,
    device: torch.device,
    shared: dict[str, Any],
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (
        ("teacher", teacher),
        ("student", loop.student),
        ("autoencoder", loop.autoencoder),
    ):
        for name, value in module.state_dict().items():
            tensors[f"{prefix}.{name}"] = value.detach().cpu().contiguous()
    for index, values in loop.optimizer.state_dict()["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["stats.teacher_mean"] = teacher_mean.cpu().contiguous()
    tensors["stats.teacher_std"] = teacher_std.cpu().contiguous()
    tensors["rng.generator"] = loop.generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    tensors_path = run_dir / STATE_TENSORS_FILE
    atomic_write(tensors_path, lambda temporary: save_file(tensors, str(temporary)))
    document = {
        "format": STATE_FORMAT,
        "step": loop.step,
        "settings": asdict(settings),
        "recent_losses": loop.recent_losses,
        "seconds": loop.seconds,
        **shared,
        "tensors_sha256": file_sha256(tensors_path),
    }
    atomic_write(
        run_dir / STATE_FILE, lambda temporary: temporary.write_text(json.dumps(document, indent=2) + "\n")
    )
    logger.info("saved the training state at step %d to %s", loop.step, run_dir / STATE_FILE)


def _load_state_tensors(run_dir: Path, document: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = run_dir / STATE_TENSORS_FILE
    if not path.is_file():
        raise CheckpointError(f"training state tensors not found: {path}")
    if document.get("tensors_sha256") != file_sha256(path):
        raise CheckpointError(
            f"{path} does not match {STATE_FILE}: the file is truncated, corrupt or from another run"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None


def _restore_module(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], source: Path) -> None:
    values = {
        key.removeprefix(f"{prefix}."): value
        for key, value in tensors.items()
        if key.startswith(f"{prefix}.")
    }
    try:
        module.load_state_dict(values)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: {prefix} weights do not fit the network: {error}") from None


def _restore_optimizer(optimizer: torch.optim.Adam, tensors: dict[str, torch.Tensor], source: Path) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    template = optimizer.state_dict()
    try:
        optimizer.load_state_dict({"state": state, "param_groups": template["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"{source}: optimizer state does not fit: {error}") from None


# ----------------------------------------------------------------------------- teacher, data, seeding


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


@dataclass(frozen=True)
class _LoopInputs:
    """What the loop reads and never changes, already on the training device."""

    teacher: PDN
    teacher_mean: torch.Tensor  # (1, 384, 1, 1)
    teacher_std: torch.Tensor  # (1, 384, 1, 1)
    train_images: torch.Tensor  # (N, 3, S, S) uint8
    penalty_pool: torch.Tensor | None  # (M, 3, 2S, 2S) uint8
    imagenet_mean: torch.Tensor  # (1, 3, 1, 1)
    imagenet_std: torch.Tensor  # (1, 3, 1, 1)
    train_pool: torch.Tensor | None = None  # (N, 3, 2S, 2S) uint8 for --augment geometric

    @classmethod
    def on(cls, device: torch.device, **tensors: Any) -> _LoopInputs:
        moved = {name: None if value is None else value.to(device) for name, value in tensors.items()}
        moved["teacher_mean"] = moved["teacher_mean"].view(1, -1, 1, 1)
        moved["teacher_std"] = moved["teacher_std"].view(1, -1, 1, 1)
        return cls(
            **moved,
            imagenet_mean=torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            imagenet_std=torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1),
        )

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float in [0, 1] -> ImageNet-normalised."""
        return (images - self.imagenet_mean) / self.imagenet_std

    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self.teacher(images).float() - self.teacher_mean) / self.teacher_std  # (B, 384, h, w)


# ----------------------------------------------------------------------------- the loop


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


def _train_step(
    batch: torch.Tensor,
    inputs: _LoopInputs,
    student: PDN,
    autoencoder: Autoencoder,
    generator: torch.Generator,
    precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """The four losses (fp32) for one batch of training images, (B, 3, S, S) float in [0, 1].

    The student sees the plain images, the jittered ones and the penalty crops in one forward pass
    (measured on 2 CPU cores: ~20% less time per step than three passes).
    """
    channels, count = TEACHER_CHANNELS, batch.shape[0]
    images_st = inputs.normalise(batch)  # (B, 3, S, S)
    images_ae = inputs.normalise(random_color_jitter(batch, generator))  # (B, 3, S, S)
    student_inputs = [images_st, images_ae]
    if inputs.penalty_pool is not None:
        crops = random_penalty_crops(inputs.penalty_pool, count, batch.shape[-1], generator)
        student_inputs.append(inputs.normalise(crops))
    with autocast(batch.device, precision):
        teacher_st = inputs.teacher_features(images_st).float()  # (B, 384, h, w)
        teacher_ae = inputs.teacher_features(images_ae).float()
        outputs = student(torch.cat(student_inputs)).float()  # (2B or 3B, 768, h, w)
        autoencoder_output = autoencoder(images_ae).float()  # (B, 384, h, w)
    student_st, student_ae = outputs[:count, :channels], outputs[count : 2 * count, channels:]
    losses = {"hard": hard_feature_loss(teacher_st, student_st)}
    if inputs.penalty_pool is not None:
        losses["penalty"] = penalty_loss(outputs[2 * count :, :channels])  # (B, 384, h, w)
    else:
        losses["penalty"] = torch.zeros((), device=batch.device)
    losses["ae"] = autoencoder_loss(teacher_ae, autoencoder_output)
    losses["stae"] = student_autoencoder_loss(autoencoder_output, student_ae)
    return losses


def train(
    data_dir: Path,
    out_dir: Path,
    settings: TrainSettings,
    *,
    resume: bool = False,
    force: bool = False,
    stop_after_step: int | None = None,
) -> Path:
    """Train on DATA_DIR (MVTec layout) and write the checkpoint into OUT_DIR; returns OUT_DIR.

    `resume`: continue the unfinished run in OUT_DIR with its saved settings (only `device` and `save_every`
    are taken from `settings`). `force`: replace a finished or unfinished run in OUT_DIR. `stop_after_step`:
    save a resumable state after that step and return without a checkpoint.
    """
    from training.device import resolve_device, resolve_precision

    run_dir = Path(out_dir)
    settings.check()
    _prepare_run_dir(run_dir, resume=resume, force=force)
    state_document = _read_state_document(run_dir) if resume else None
    if state_document is not None:
        stored = saved_settings(run_dir)
        changed = [f.name for f in fields(TrainSettings) if f.name not in ("device", "save_every")
                   and getattr(stored, f.name) != getattr(settings, f.name)]  # fmt: skip
        if changed:
            logger.info("resuming with the run's saved settings (ignoring the given %s)", ", ".join(changed))
        settings = replace(stored, device=settings.device, save_every=settings.save_every)
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    logger.info("training on %s in %s", device, precision)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    _seed_everything(settings.seed)
    started = time.perf_counter()

    # Teacher and data; every input error surfaces here, before any training.
    if state_document is not None:
        teacher, teacher_record = (
            PDN(size=settings.size, out_channels=TEACHER_CHANNELS),
            state_document["teacher"],
        )
    else:
        teacher, teacher_record = load_teacher_for_training(
            settings.teacher, settings.size, settings.image_size
        )
        settings = replace(settings, teacher=teacher_record["source"])
    category = scan_category(Path(data_dir))
    train_paths, validation_paths = split_validation(
        category.train_images, settings.validation_fraction, settings.seed
    )
    fingerprint = data_fingerprint(category.root, category.train_images)
    if state_document is not None and state_document["data"]["fingerprint"] != fingerprint:
        raise UserError(
            f"the training images in {category.root / 'train' / 'good'} changed since the run in {run_dir} "
            "started (data fingerprint differs): restore them or start a new run"
        )
    train_images = load_images(train_paths, settings.image_size, desc="loading training")  # (N, 3, S, S)
    train_pool = (  # (N, 3, 2S, 2S): zoomed windows are downsampled from it
        load_images(train_paths, 2 * settings.image_size, desc="loading training at 2x")
        if settings.augment == "geometric"
        else None
    )
    validation_images = load_images(validation_paths, settings.image_size, desc="loading validation")
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
    shared = {
        "teacher": teacher_record,
        "data": {
            "dir": str(category.root.resolve()),
            "fingerprint": fingerprint,
            "train_images": len(train_paths),
            "validation_images": [relative_name(path, category.root) for path in validation_paths],
            "validation_fraction": settings.validation_fraction,
            "seed": settings.seed,
        },
        "penalty": penalty_record,
    }

    # Networks, optimiser and generator; restored from the saved state when resuming.
    student = PDN(size=settings.size, out_channels=2 * TEACHER_CHANNELS)
    autoencoder = Autoencoder(out_channels=TEACHER_CHANNELS, image_size=settings.image_size)
    optimizer = torch.optim.Adam(
        [*student.parameters(), *autoencoder.parameters()],
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
    )
    generator = torch.Generator().manual_seed(settings.seed)
    loop = _LoopState(0, student, autoencoder, optimizer, generator, {}, 0.0)
    if state_document is not None:
        tensors = _load_state_tensors(run_dir, state_document)
        for prefix, module in (("teacher", teacher), ("student", student), ("autoencoder", autoencoder)):
            _restore_module(module, prefix, tensors, run_dir / STATE_TENSORS_FILE)
        teacher_mean, teacher_std = tensors["stats.teacher_mean"], tensors["stats.teacher_std"]
        generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        loop.step = int(state_document["step"])
        loop.recent_losses = dict(state_document.get("recent_losses", {}))
        loop.seconds = float(state_document.get("seconds", 0.0))
        logger.info("resuming %s at step %d of %d", run_dir, loop.step, settings.steps)
    teacher.to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    student.to(device)
    autoencoder.to(device)
    if state_document is not None:
        _restore_optimizer(optimizer, tensors, run_dir / STATE_TENSORS_FILE)
    else:
        teacher_mean, teacher_std = teacher_channel_stats(teacher, train_images, device)
    run_dir.mkdir(parents=True, exist_ok=True)

    def save_state() -> None:
        _save_state(
            run_dir,
            loop,
            settings=settings,
            teacher=teacher,
            teacher_mean=teacher_mean,
            teacher_std=teacher_std,
            device=device,
            shared=shared,
        )

    end_step = settings.steps if stop_after_step is None else min(settings.steps, stop_after_step)
    try:
        inputs = _LoopInputs.on(
            device,
            teacher=teacher,
            teacher_mean=teacher_mean,
            teacher_std=teacher_std,
            train_images=train_images,
            train_pool=train_pool,
            penalty_pool=penalty_pool,
        )
        with sigterm_as_interrupt():  # `kill` or a scheduler's stop saves a resumable state, as Ctrl-C
            _run_loop(
                loop, end_step, settings=settings, inputs=inputs, save_state=save_state, precision=precision
            )
    except KeyboardInterrupt:
        save_state()
        logger.warning("interrupted at step %d: continue with --resume", loop.step)
        raise
    if loop.step < settings.steps:
        save_state()
        logger.info("stopped after step %d of %d: continue with --resume", loop.step, settings.steps)
        return run_dir

    # Statistics, threshold, checkpoint, evaluation (all on the weights as the checkpoint stores them).
    student.eval()
    autoencoder.eval()
    storage_dtype = CHECKPOINT_DTYPES[settings.checkpoint_dtype]
    for module in (teacher, student, autoencoder):
        round_weights(module, storage_dtype)
    stats = map_quantiles(teacher, student, autoencoder, teacher_mean, teacher_std, validation_images, device)
    validation_scores = image_scores(teacher, student, autoencoder, stats, validation_images, device)
    metadata: dict[str, Any] = {
        "threshold": default_threshold(validation_scores),
        "threshold_rule": THRESHOLD_RULE,
        "validation_scores": {
            "min": float(validation_scores.min()),
            "median": float(np.median(validation_scores)),
            "max": float(validation_scores.max()),
        },
        "teacher": teacher_record,
        "training": {
            **asdict(settings),
            "device_used": str(device),
            "precision_used": precision,
            "steps_completed": loop.step,
            "final_losses": loop.recent_losses,
            "seconds": loop.seconds,
            "wall_seconds_last_session": time.perf_counter() - started,
            "penalty": penalty_record,
        },
        "data": shared["data"],
        "metrics": None,
    }
    config = ModelConfig(size=settings.size, image_size=settings.image_size)
    networks = {"teacher": teacher, "student": student, "autoencoder": autoencoder}
    save_checkpoint(run_dir, config=config, **networks, stats=stats, metadata=metadata, dtype=storage_dtype)
    if test_set is not None:
        metrics = evaluate_networks(teacher, student, autoencoder, stats, test_set, device)
        metrics.pop("scores")
        metadata["metrics"] = metrics
        save_checkpoint(
            run_dir, config=config, **networks, stats=stats, metadata=metadata, dtype=storage_dtype
        )
        logger.info("test metrics: %s", json.dumps(metrics["overall"]))
    for name in (STATE_FILE, STATE_TENSORS_FILE):
        (run_dir / name).unlink(missing_ok=True)
    logger.info("checkpoint written to %s", run_dir / METADATA_FILE)
    return run_dir


def _run_loop(
    loop: _LoopState,
    end_step: int,
    *,
    settings: TrainSettings,
    inputs: _LoopInputs,
    save_state: Callable[[], None],
    precision: str = "fp32",
) -> None:
    """Steps loop.step .. end_step - 1; `loop` is updated after each step (so Ctrl-C saves it)."""
    loop.student.train()
    loop.autoencoder.train()
    totals: torch.Tensor | None = None
    window = 0
    seconds_before, session_started = loop.seconds, time.perf_counter()
    progress = tqdm(
        total=settings.steps,
        initial=loop.step,
        desc="training",
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not 10 per s
    )
    try:
        while loop.step < end_step:
            for group in loop.optimizer.param_groups:
                group["lr"] = learning_rate_at(loop.step, settings)
            draws = torch.randint(
                0, inputs.train_images.shape[0], (settings.batch_size,), generator=loop.generator
            )
            if inputs.train_pool is None:
                picked = [inputs.train_images[index] for index in draws.tolist()]  # CPU indices: no sync
                batch = torch.stack(picked).float() / 255.0  # (B, 3, S, S)
            else:
                picked = torch.stack([inputs.train_pool[index] for index in draws.tolist()])  # (B, 3, 2S, 2S)
                batch = random_geometric(picked, settings.image_size, loop.generator)  # (B, 3, S, S)
            losses = _train_step(batch, inputs, loop.student, loop.autoencoder, loop.generator, precision)
            total = losses["hard"] + losses["penalty"] + losses["ae"] + losses["stae"]
            loop.optimizer.zero_grad(set_to_none=True)
            total.backward()
            loop.optimizer.step()
            loop.step += 1
            progress.update(1)
            values = torch.stack([total.detach(), *(loss.detach() for loss in losses.values())])
            totals = values if totals is None else totals + values
            window += 1
            if window == LOG_EVERY or loop.step == end_step:
                means = (totals / window).tolist()  # one GPU sync per LOG_EVERY steps
                loop.recent_losses = dict(zip(("total", *losses.keys()), means, strict=True))
                if not np.isfinite(means[0]):
                    raise RuntimeError(
                        f"the training loss became {means[0]} at step {loop.step}: try a lower learning rate"
                    )
                progress.set_postfix({name: f"{value:.4f}" for name, value in loop.recent_losses.items()})
                totals, window = None, 0
            loop.seconds = seconds_before + time.perf_counter() - session_started
            if settings.save_every and loop.step % settings.save_every == 0 and loop.step < settings.steps:
                save_state()
    finally:
        progress.close()
