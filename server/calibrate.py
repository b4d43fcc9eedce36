"""`efficientad calibrate`: choose a model's decision threshold for a false-alarm rate on a production line.

Every image in a folder of good parts (and, optionally, one of defects) is scored by the model's own
graph, the way the server scores it: the same decode and resize (`server.imaging.decode_for_model`, the
server's default size limits) and model.onnx on ONNX Runtime (CPU). The threshold for a false-alarm rate
r is the smallest good score t with at most a fraction r of the good scores above it (the server flags
`score > threshold`): with the N good scores sorted ascending s_1..s_N, t = s_k, k = ceil(N (1 - r)).
Fewer than 1/r good images cannot resolve r; the threshold is then the largest good score.

With defects: the miss rate (defect scores <= t) and the image AUROC (rank formula, ties count half).
Torch-free: numpy, Pillow, onnxruntime and the server's own modules only.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from efficientad.errors import UserError
from efficientad.files import atomic_write
from efficientad.model_dir import ModelInfo, read_model_dir, write_threshold
from efficientad.scores import (
    exact_rate,
    false_alarm_rate,
    image_auroc,
    images_needed,
    labelled,
    miss_rate,
    rate_is_resolvable,
    threshold_for_false_alarm_rate,
)
from server.backends import OnnxRuntimeBackend
from server.config import Settings
from server.imaging import IMAGE_SUFFIXES, ImageError, content_type_for, decode_for_model

logger = logging.getLogger(__name__)

DEFAULT_FALSE_ALARM_RATE = 0.01
DEFAULT_BATCH_SIZE = 8
SOURCE = "efficientad calibrate"
REPORT_FORMAT = "efficientad-calibration"
REPORT_FORMAT_VERSION = 1
THRESHOLD_RULE = "smallest good score t with at most false_alarm_rate of the good scores above t"


class CalibrationError(UserError):
    """A folder, image or option that calibration cannot use, named in the message."""


@dataclass(frozen=True)
class ScoredSet:
    """The images of one folder and their scores, in the same (sorted path) order."""

    folder: Path
    paths: list[Path]
    scores: np.ndarray  # (N,) float64

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": str(self.folder),
            "count": len(self.paths),
            "images": [
                {"path": str(path), "score": float(score)}
                for path, score in zip(self.paths, self.scores, strict=True)
            ],
        }


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` found: the new threshold and how it (and the current one) do on these images."""

    model: ModelInfo
    false_alarm_rate: float
    threshold: float
    resolvable: bool  # False: too few good images for the rate, the threshold is the max good score
    good: ScoredSet
    defects: ScoredSet | None

    @property
    def current_threshold(self) -> float | None:
        return self.model.threshold

    @property
    def current_false_alarm_rate(self) -> float | None:
        current = self.current_threshold
        return None if current is None else false_alarm_rate(self.good.scores, current)

    @property
    def miss_rate(self) -> float | None:
        return None if self.defects is None else miss_rate(self.defects.scores, self.threshold)

    @property
    def current_miss_rate(self) -> float | None:
        current = self.current_threshold
        return None if self.defects is None or current is None else miss_rate(self.defects.scores, current)

    @property
    def auroc(self) -> float | None:
        return None if self.defects is None else image_auroc(*labelled(self.good.scores, self.defects.scores))

    def history_details(self) -> dict[str, Any]:
        """Where the new threshold comes from, for model.json's threshold_history entry."""
        details: dict[str, Any] = {
            "source": SOURCE,
            "false_alarm_rate": self.false_alarm_rate,
            "good_images": len(self.good.paths),
            "good_dir": str(self.good.folder.resolve()),
            "rate_resolvable": self.resolvable,
            "model_version": self.model.version,
        }
        if self.defects is not None:
            details |= {
                "defect_images": len(self.defects.paths),
                "defect_dir": str(self.defects.folder.resolve()),
                "miss_rate": self.miss_rate,
                "auroc": self.auroc,
            }
        return details

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "format_version": REPORT_FORMAT_VERSION,
            "model_dir": str(self.model.path),
            "model_version": self.model.version,
            "input": {"height": self.model.input_height, "width": self.model.input_width},
            "false_alarm_rate": self.false_alarm_rate,
            "threshold": self.threshold,
            "threshold_rule": THRESHOLD_RULE,
            "rate_resolvable": self.resolvable,
            "observed_false_alarm_rate": false_alarm_rate(self.good.scores, self.threshold),
            "miss_rate": self.miss_rate,
            "auroc": self.auroc,
            "current_threshold": self.current_threshold,
            "current_false_alarm_rate": self.current_false_alarm_rate,
            "current_miss_rate": self.current_miss_rate,
            "good": self.good.to_json(),
            "defects": None if self.defects is None else self.defects.to_json(),
        }


def find_images(folder: Path) -> list[Path]:
    """Every image file (suffix in any case) under `folder`, recursively, sorted; CalibrationError if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"image folder not found: {folder}")
    images = sorted(
        path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )
    if not images:
        raise CalibrationError(f"no images ({' '.join(IMAGE_SUFFIXES)}) in {folder} or its subfolders")
    return images


def _server_image_limits() -> tuple[int, int]:
    """(max pixels, min side): the server's defaults, so an image it would refuse is refused here too."""
    fields = Settings.model_fields
    return int(fields["max_image_pixels"].default), int(fields["min_image_side"].default)


def load_image(path: Path, model: ModelInfo) -> np.ndarray:
    """One image file -> (3, H, W) uint8 at the model's input size, decoded exactly as the server does."""
    max_pixels, min_side = _server_image_limits()
    try:
        data = path.read_bytes()
        pixels, _ = decode_for_model(
            data,
            content_type=content_type_for(path),
            height=model.input_height,
            width=model.input_width,
            max_pixels=max_pixels,
            min_side=min_side,
        )
    except OSError as error:
        raise CalibrationError(f"cannot read {path}: {error.strerror or error}") from None
    except ImageError as error:
        raise CalibrationError(f"cannot use {path}: {error}") from None
    return pixels


def _progress(total: int, batch_size: int, description: str) -> Any:
    """A tqdm bar on stderr, shown on a terminal only and only when there is more than one batch."""
    from tqdm import tqdm

    return tqdm(
        total=total, desc=description, unit="img", leave=False, disable=None if total > batch_size else True
    )


def score_images(
    paths: Sequence[Path],
    model: ModelInfo,
    infer: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    description: str = "scoring",
) -> np.ndarray:
    """The model's score for each image, (N,) float64, `batch_size` images per `infer` call."""
    scores: list[float] = []
    with _progress(len(paths), batch_size, description) as progress:
        for start in range(0, len(paths), batch_size):
            batch_paths = paths[start : start + batch_size]
            images = np.stack([load_image(path, model) for path in batch_paths])  # (B, 3, H, W) uint8
            _, batch_scores = infer(images)
            for path, score in zip(batch_paths, batch_scores.tolist(), strict=True):
                if not math.isfinite(score):
                    raise CalibrationError(f"the model scored {path} as {score}: the model dir is unusable")
                scores.append(float(score))
            progress.update(len(batch_paths))
    return np.asarray(scores, dtype=np.float64)


def unresolved_rate_warning(count: int, rate: float) -> str:
    """The one-line warning for too few good images to resolve `rate`."""
    needed = images_needed(rate)
    needs = "no finite number of images can" if needed is None else f"that needs at least {needed}"
    return (
        f"{count} good images cannot resolve a false-alarm rate of {rate:g} ({needs}): "
        "the threshold is the largest good score"
    )


def _check_options(false_alarm_rate: float, batch_size: int, threads: int) -> None:
    try:
        exact_rate(false_alarm_rate)
    except ValueError as error:
        raise CalibrationError(f"--false-alarm-rate: {error}") from None
    if batch_size < 1:
        raise CalibrationError(f"--batch-size must be at least 1, got {batch_size}")
    if threads < 0:
        raise CalibrationError(f"--threads must be 0 (all usable cores) or more, got {threads}")


def _check_disjoint(good: list[Path], defects: list[Path], defect_dir: Path | None) -> None:
    shared = sorted({path.resolve() for path in good} & {path.resolve() for path in defects})
    if shared:
        raise CalibrationError(
            f"{len(shared)} images under {defect_dir} are also under the good folder (e.g. {shared[0]}): "
            "give two separate folders"
        )


def _score_folder(
    folder: Path, paths: list[Path], model: ModelInfo, backend: OnnxRuntimeBackend, batch_size: int
) -> ScoredSet:
    scores = score_images(paths, model, backend.infer, batch_size=batch_size, description=folder.name)
    return ScoredSet(folder, paths, scores)


def calibrate(
    model_dir: Path,
    good_dir: Path,
    *,
    defect_dir: Path | None = None,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int = 0,
) -> Calibration:
    """Score the good (and defect) images with MODEL_DIR/model.onnx on the CPU and pick the threshold.

    Raises a UserError naming the path for a missing or foreign model dir, a missing or empty image
    folder, or an image the server would refuse (checked before any image is scored where possible).
    """
    _check_options(false_alarm_rate, batch_size, threads)
    model = read_model_dir(Path(model_dir))
    good_dir = Path(good_dir)
    defect_dir = None if defect_dir is None else Path(defect_dir)
    good_paths = find_images(good_dir)
    defect_paths = [] if defect_dir is None else find_images(defect_dir)
    _check_disjoint(good_paths, defect_paths, defect_dir)
    backend = OnnxRuntimeBackend(model, device="cpu", intra_op_threads=threads)
    try:
        good = _score_folder(good_dir, good_paths, model, backend, batch_size)
        defects = None
        if defect_dir is not None:
            defects = _score_folder(defect_dir, defect_paths, model, backend, batch_size)
    finally:
        backend.close()
    resolvable = rate_is_resolvable(len(good.paths), false_alarm_rate)
    if not resolvable:
        logger.warning("%s", unresolved_rate_warning(len(good.paths), false_alarm_rate))
    return Calibration(
        model=model,
        false_alarm_rate=float(false_alarm_rate),
        threshold=threshold_for_false_alarm_rate(good.scores, false_alarm_rate),
        resolvable=resolvable,
        good=good,
        defects=defects,
    )


def write_calibration(calibration: Calibration) -> dict[str, Any]:
    """Store the new threshold in the model dir's model.json (history kept); returns the history entry."""
    entry = write_threshold(
        calibration.model.path, calibration.threshold, details=calibration.history_details()
    )
    logger.info(
        "%s: threshold %s -> %s (the previous value is in threshold_history)",
        calibration.model.path / "model.json",
        entry["threshold"],
        calibration.threshold,
    )
    return entry


def write_report(calibration: Calibration, path: Path, *, written: bool) -> None:
    """Everything as JSON (scores per image, thresholds, rates, AUROC), written atomically to `path`."""
    document = {**calibration.to_json(), "written": written}
    text = json.dumps(document, indent=2) + "\n"
    try:
        atomic_write(Path(path), lambda temporary: temporary.write_text(text))
    except OSError as error:
        raise CalibrationError(f"cannot write {path}: {error.strerror or error}") from None


def _count_above(scores: np.ndarray, threshold: float) -> int:
    return int(np.count_nonzero(scores > threshold))


def _score_range(scored: ScoredSet) -> str:
    scores = scored.scores
    return (
        f"{len(scores)} images in {scored.folder}: scores min {scores.min():.6f}  "
        f"median {float(np.median(scores)):.6f}  max {scores.max():.6f}"
    )


def _threshold_lines(calibration: Calibration) -> list[str]:
    good, count = calibration.good.scores, len(calibration.good.paths)
    new, current = calibration.threshold, calibration.current_threshold
    rule = "" if calibration.resolvable else "; too few images for this rate: the largest good score"
    lines = [
        f"threshold   {new:.6f} for a false-alarm rate <= {calibration.false_alarm_rate:g}, based on "
        f"{count} good images ({_count_above(good, new)} of {count} above it{rule})"
    ]
    if current is None:
        lines.append("current     none in model.json (is_anomaly is not decided without one)")
    else:
        lines.append(
            f"current     {current:.6f} (model.json): false-alarm rate "
            f"{calibration.current_false_alarm_rate:.4f} on these good images "
            f"({_count_above(good, current)} of {count} above it)"
        )
    return lines


def _defect_lines(calibration: Calibration) -> list[str]:
    if calibration.defects is None:
        return []
    defects = calibration.defects.scores
    missed = len(defects) - _count_above(defects, calibration.threshold)
    current = calibration.current_miss_rate
    at_current = "" if current is None else f"; {current:.4f} at the current one"
    return [
        f"miss rate   {calibration.miss_rate:.4f} at the new threshold ({missed} of {len(defects)} "
        f"defect images at or below it){at_current}",
        f"AUROC       {calibration.auroc:.4f} (image level, good vs defect)",
    ]


def _written_line(calibration: Calibration, written: dict[str, Any] | None) -> str:
    if written is None:
        return "not written (add --write to store the new threshold in model.json)"
    previous = "none" if written["threshold"] is None else f"{written['threshold']:.6f}"
    return (
        f"written     {calibration.threshold:.6f} to {calibration.model.path / 'model.json'} "
        f"(was {previous}, kept in threshold_history); serve it with POST /v1/models/NAME/reload or SIGHUP"
    )


def summary_lines(calibration: Calibration, *, written: dict[str, Any] | None = None) -> list[str]:
    """The result as the lines the CLI prints (model, scores, thresholds, rates, AUROC, what was written)."""
    model = calibration.model
    lines = [
        f"model       {model.path} (version {model.version}, input {model.input_width}x{model.input_height})",
        f"good        {_score_range(calibration.good)}",
    ]
    if calibration.defects is not None:
        lines.append(f"defects     {_score_range(calibration.defects)}")
    return [
        *lines,
        *_threshold_lines(calibration),
        *_defect_lines(calibration),
        _written_line(calibration, written),
    ]
