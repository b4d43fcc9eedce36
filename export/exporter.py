"""Checkpoint -> model directory: fuse, export to ONNX, check parity, describe, then move into place.

Everything is written into a temporary folder beside the output and renamed at the end, so a failed
export (bad checkpoint, exporter error, failed parity) leaves nothing half-written behind.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from efficientad.errors import UserError
from efficientad.files import file_sha256
from efficientad.model_dir import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    MODEL_JSON_FILE,
    ONNX_FILE,
    ModelInfo,
    io_description,
    read_model_dir,
)

logger = logging.getLogger(__name__)

MAX_PARITY_IMAGES = (
    16  # also stored as parity_images.npy for the engine's FP16 check (~200 KB each at 256 px)
)


class ExportError(UserError):
    """The export cannot proceed (output exists, bad parity images, ...), named in the message."""


def _versions(opset: int) -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    from training.checkpoint import PACKAGE_VERSION

    return {
        "efficientad": PACKAGE_VERSION,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": str(opset),
        "python": platform.python_version(),
    }


def _checkpoint_summary(checkpoint: Any, run_dir: Path) -> dict[str, Any]:
    metadata = checkpoint.metadata
    teacher = metadata.get("teacher") if isinstance(metadata.get("teacher"), dict) else {}
    return {
        "source": str(Path(run_dir).resolve()),
        "sha256": checkpoint.sha256,
        "teacher": teacher,
        "teacher_random": bool(teacher.get("random", False)),
        "metrics": metadata.get("metrics", {}),
        "threshold_source": metadata.get("threshold_source"),
        "versions": metadata.get("versions", {}),
    }


def _model_document(
    checkpoint: Any, run_dir: Path, onnx_path: Path, opset: int, parity: dict[str, Any]
) -> dict[str, Any]:
    from training.networks import IMAGENET_MEAN, IMAGENET_STD

    size = checkpoint.config.image_size
    stats = checkpoint.stats
    summary = _checkpoint_summary(checkpoint, run_dir)
    warnings = []
    if summary["teacher_random"]:
        warnings.append("the teacher is randomly initialised (not distilled): scores are for testing only")
    if checkpoint.threshold is None:
        warnings.append("the checkpoint has no threshold: is_anomaly cannot be decided without one")
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model_size": checkpoint.config.size,
        **io_description(size, size),
        "threshold": checkpoint.threshold,
        "normalisation": {  # for reference: all of it happens inside the graph
            "imagenet_mean": list(IMAGENET_MEAN),
            "imagenet_std": list(IMAGENET_STD),
            "pixel_scale": 1 / 255,
            "teacher_mean": [float(v) for v in stats.teacher_mean.cpu()],
            "teacher_std": [float(v) for v in stats.teacher_std.cpu()],
            "q_st_a": float(stats.q_st_a),
            "q_st_b": float(stats.q_st_b),
            "q_ae_a": float(stats.q_ae_a),
            "q_ae_b": float(stats.q_ae_b),
            "map_padding": 4,
        },
        "onnx": {
            "file": ONNX_FILE,
            "sha256": file_sha256(onnx_path),
            "opset": opset,
            "exporter": "torch.export",
        },
        "checkpoint": summary,
        "versions": _versions(opset),
        "parity": parity,
        "warnings": warnings,
    }


def _check_statistics(checkpoint: Any, run_dir: Path) -> None:
    """Map statistics that would divide by zero make every map NaN: refuse them with a clear message."""
    stats = checkpoint.stats
    for low, high in (("q_st_a", "q_st_b"), ("q_ae_a", "q_ae_b")):
        a, b = float(getattr(stats, low)), float(getattr(stats, high))
        if not b > a:
            raise ExportError(
                f"{run_dir}: degenerate map quantiles ({low}={a:.6g}, {high}={b:.6g}; need {high} > {low})"
            )
    if not bool((stats.teacher_std > 0).all()):
        raise ExportError(f"{run_dir}: teacher channel std has zero or negative entries")


def _check_replaceable(out_dir: Path) -> None:
    """--force replaces an earlier model dir or an empty folder, never some other folder's contents."""
    if not out_dir.is_dir():
        raise ExportError(f"output {out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and not (out_dir / MODEL_JSON_FILE).is_file():
        raise ExportError(
            f"output {out_dir} exists and is not a model directory (no {MODEL_JSON_FILE}): not replacing it"
        )


def _replace_directory(staging: Path, out_dir: Path) -> None:
    """Move the finished staging folder to `out_dir`; an old one is replaced only once the new one is done."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    retired = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.replace(out_dir, retired / out_dir.name)
    try:
        os.replace(staging, out_dir)
    except OSError:
        os.replace(retired / out_dir.name, out_dir)  # put the old model back
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def _resolve_parity_images(parity_images: list[Path] | None) -> list[Path]:
    from export.parity import default_parity_images
    from training.images import IMAGE_SUFFIXES, list_images

    if parity_images is None:
        images = default_parity_images()
        if not images:
            raise ExportError(
                "no parity images: this install has no bundled samples/cookie; pass --parity-images DIR"
            )
        return images
    resolved: list[Path] = []
    for path in map(Path, parity_images):
        if path.is_dir():
            resolved.extend(list_images(path))
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            resolved.append(path)
        else:
            raise ExportError(f"parity image not found or not an image file: {path}")
    if not resolved:
        raise ExportError("the parity image list is empty")
    if len(resolved) > MAX_PARITY_IMAGES:
        logger.info("using the first %d of %d parity images", MAX_PARITY_IMAGES, len(resolved))
    return resolved[:MAX_PARITY_IMAGES]


def _resolve_calibration_images(calibration_images: list[Path] | None) -> list[Path]:
    """Good images for INT8 calibration: the given files/folders, else bundled samples/cookie/train/good."""
    from export.parity import SAMPLES_DIR

    if calibration_images is None:
        default = SAMPLES_DIR.parent / "train" / "good"
        if not default.is_dir():
            raise ExportError("--int8 needs good images to calibrate on: pass --calibration-images DIR")
        calibration_images = [default]
    return _resolve_parity_images(calibration_images)


def export_model(
    run_dir: Path,
    out_dir: Path,
    *,
    force: bool = False,
    parity_images: list[Path] | None = None,
    opset: int | None = None,
    int8: bool = False,
    calibration_images: list[Path] | None = None,
) -> ModelInfo:
    """Export the checkpoint in `run_dir` to the model directory `out_dir` (model.onnx + model.json).

    With `int8`, also try `model.int8.onnx` (export/quantize.py), kept only if it keeps the decisions on
    the parity images and is faster on this CPU. Raises a UserError subclass (CheckpointError,
    ExportError, ParityError) naming the problem; on any failure `out_dir` is left as it was and no
    temporary folder remains.
    """
    from export.fused import FusedEfficientAD
    from export.onnx_export import DEFAULT_OPSET, MIN_OPSET, export_onnx
    from export.parity import check_parity, load_images
    from export.tensorrt_engine import PARITY_IMAGES_FILE
    from training.checkpoint import load_checkpoint

    opset = DEFAULT_OPSET if opset is None else int(opset)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if opset < MIN_OPSET:
        raise ExportError(
            f"--opset {opset} is not supported: the torch.export-based exporter emits opset >= {MIN_OPSET} "
            "(read by TensorRT 10, ONNX Runtime >= 1.14 and Triton)"
        )
    if out_dir.exists() and not force:
        raise ExportError(f"output {out_dir} already exists (use --force to replace it)")
    if out_dir.exists():
        _check_replaceable(out_dir)
    images = _resolve_parity_images(parity_images)
    calibration = _resolve_calibration_images(calibration_images) if int8 else []
    checkpoint = load_checkpoint(run_dir, "cpu")
    _check_statistics(checkpoint, run_dir)
    fused = FusedEfficientAD.from_checkpoint(checkpoint)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    staging.chmod(0o755)  # mkdtemp makes it private; a model dir is meant to be read by the server
    try:
        onnx_path = staging / ONNX_FILE
        export_onnx(fused, onnx_path, opset=opset)
        pixels = load_images(images, checkpoint.config.image_size)  # (N, 3, S, S) uint8
        names = [path.name for path in images]
        parity = check_parity(checkpoint, onnx_path, pixels, names).as_dict()
        parity["inputs_file"] = PARITY_IMAGES_FILE
        np.save(staging / PARITY_IMAGES_FILE, pixels.numpy(), allow_pickle=False)
        document = _model_document(checkpoint, run_dir, onnx_path, opset, parity)
        if int8:
            from export.quantize import INT8_FILE, quantize_int8

            size = checkpoint.config.image_size
            document["int8"] = quantize_int8(
                onnx_path,
                staging / INT8_FILE,
                calibration_images=load_images(calibration, size).numpy(),
                test_images=pixels.numpy(),
                threshold=checkpoint.threshold,
            )
        (staging / MODEL_JSON_FILE).write_text(json.dumps(document, indent=2) + "\n")
        read_model_dir(staging)  # the folder we are about to publish reads back
        _replace_directory(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    info = read_model_dir(out_dir)
    logger.info("exported %s -> %s (version %s)", run_dir, out_dir, info.version)
    return info
