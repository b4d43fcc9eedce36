"""The model directory (export -> server): `model.onnx` + `model.json` + `engines/*.plan`.

The contract between the exporter (which writes model dirs) and the server (which reads them). Torch-free
on purpose, and part of the core package so that the server need not import the exporter: this module
imports only the standard library and `efficientad.*`.

    MODEL_DIR/
      model.onnx                                   fused graph: image uint8 (N,3,H,W) -> anomaly_map, score
      model.json                                   format "efficientad-model", input size, threshold, ...
      engines/<gpu>__trt<version>__b<max>.plan     TensorRT engines built on the serving machine
      engines/timing.cache                         TensorRT timing cache shared by builds

`write_threshold` is the one change made to model.json after export: a new decision threshold (the
replaced one kept in its "threshold_history"); model.onnx, and so the version, stay as they are.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficientad.errors import UserError
from efficientad.files import atomic_write, file_sha256, read_versioned_json

__all__ = [
    "ENGINES_DIR",
    "ENGINE_SUFFIX",
    "INPUT_NAME",
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "MODEL_JSON_FILE",
    "ONNX_FILE",
    "OUTPUT_NAMES",
    "THRESHOLD_HISTORY_FIELD",
    "VERSION_HEX_DIGITS",
    "ModelDirError",
    "ModelInfo",
    "engine_filename",
    "find_engine",
    "io_description",
    "parse_engine_filename",
    "read_model_dir",
    "write_threshold",
]

MODEL_FORMAT = "efficientad-model"
MODEL_FORMAT_VERSION = 1
ONNX_FILE = "model.onnx"
MODEL_JSON_FILE = "model.json"
ENGINES_DIR = "engines"
ENGINE_SUFFIX = ".plan"
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")
VERSION_HEX_DIGITS = 12
THRESHOLD_HISTORY_FIELD = "threshold_history"

_ENGINE_NAME = re.compile(r"^(?P<gpu>[A-Za-z0-9.-]+)__trt(?P<trt>[A-Za-z0-9.-]+)__b(?P<batch>[0-9]+)\.plan$")


class ModelDirError(UserError):
    """A model directory that is missing, incomplete or foreign, named in the message."""


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    name: str
    input_height: int
    input_width: int
    model_size: str
    threshold: float | None
    checkpoint_sha256: str
    version: str  # first 12 hex digits of model.onnx's sha256
    onnx_path: Path
    engines_dir: Path
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def io_description(height: int, width: int) -> dict[str, Any]:
    """model.json's "input" and "outputs" for a graph at height x width: the contract the server checks."""
    return {
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NCHW",
            "color": "RGB",
            "height": height,
            "width": width,
        },
        "outputs": {
            OUTPUT_NAMES[0]: {"dtype": "float32", "shape": ["batch", 1, height, width]},
            OUTPUT_NAMES[1]: {"dtype": "float32", "shape": ["batch"]},
        },
    }


def read_model_dir(path: Path, *, name: str | None = None, verify_hash: bool = True) -> ModelInfo:
    """Describe the model in `path`; a ModelDirError naming the path if it is not a complete model dir.

    With `verify_hash` (the default) model.onnx must match the sha256 recorded in model.json, so a
    truncated or swapped graph is caught before it is served.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model directory not found: {path}")
    onnx_path, json_path = path / ONNX_FILE, path / MODEL_JSON_FILE
    if not json_path.is_file():
        raise ModelDirError(f"{json_path} is missing: not a model directory (run `efficientad export` first)")
    if not onnx_path.is_file():
        raise ModelDirError(
            f"{onnx_path} is missing: the model directory is incomplete (re-run `efficientad export`)"
        )
    document = read_versioned_json(
        json_path,
        expected_format=MODEL_FORMAT,
        max_version=MODEL_FORMAT_VERSION,
        error=ModelDirError,
        what="an EfficientAD model description",
    )
    try:
        image_input = document["input"]
        height, width = int(image_input["height"]), int(image_input["width"])
        model_size = str(document["model_size"])
        checkpoint_sha256 = str(document["checkpoint"]["sha256"])
        recorded_onnx_sha256 = str(document["onnx"]["sha256"])
        threshold = document.get("threshold")
        threshold = None if threshold is None else float(threshold)
    except (KeyError, TypeError, ValueError) as error:
        raise ModelDirError(f"{json_path}: field missing or malformed ({error!r})") from None
    onnx_sha256 = file_sha256(onnx_path) if verify_hash else recorded_onnx_sha256
    if onnx_sha256 != recorded_onnx_sha256:
        raise ModelDirError(
            f"{onnx_path} does not match {json_path.name} (sha256 {onnx_sha256[:12]}..., expected "
            f"{recorded_onnx_sha256[:12]}...): the graph is truncated, corrupt or from another export"
        )
    return ModelInfo(
        path=path,
        name=name or path.resolve().name,
        input_height=height,
        input_width=width,
        model_size=model_size,
        threshold=threshold,
        checkpoint_sha256=checkpoint_sha256,
        version=onnx_sha256[:VERSION_HEX_DIGITS],
        onnx_path=onnx_path,
        engines_dir=path / ENGINES_DIR,
        metadata=document,
    )


def write_threshold(model_dir: Path, threshold: float, *, details: Mapping[str, Any]) -> dict[str, Any]:
    """Set model.json's "threshold" to `threshold`; returns the history entry appended for the old one.

    The entry is `{"threshold": previous, "replaced_at": ISO UTC time, "new_threshold": threshold,
    **details}` (details: where the new value comes from, e.g. source, false_alarm_rate, good_images).
    The model dir must be complete and model.onnx must match its recorded sha256 (ModelDirError
    otherwise); model.json is replaced atomically with the same permissions, model.onnx is not touched.
    """
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"the threshold must be a finite number, got {threshold}")
    reserved = {"threshold", "replaced_at", "new_threshold"} & set(details)
    if reserved:
        raise ValueError(f"details may not set {sorted(reserved)}: write_threshold fills them in")
    info = read_model_dir(model_dir)
    json_path = info.path / MODEL_JSON_FILE
    document = dict(info.metadata)
    history = document.get(THRESHOLD_HISTORY_FIELD, [])
    if not isinstance(history, list):
        raise ModelDirError(f"{json_path}: {THRESHOLD_HISTORY_FIELD!r} is not a list")
    entry = {
        "threshold": document.get("threshold"),
        "replaced_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "new_threshold": threshold,
        **details,
    }
    document["threshold"] = threshold
    document[THRESHOLD_HISTORY_FIELD] = [*history, entry]
    text = json.dumps(document, indent=2) + "\n"
    mode = json_path.stat().st_mode & 0o777

    def write(temporary: Path) -> None:
        temporary.write_text(text)
        os.chmod(temporary, mode)  # the temporary file is created 0600: keep model.json readable

    try:
        atomic_write(json_path, write)
    except OSError as error:
        raise ModelDirError(f"cannot write {json_path}: {error.strerror or error}") from None
    return entry


def _slug(text: str) -> str:
    """File-name-safe: letters, digits, dots, dashes ("NVIDIA H100 80GB HBM3" -> "NVIDIA-H100-80GB-HBM3")."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", text.strip()).strip("-")
    if not slug:
        raise ValueError(f"cannot make a file name from {text!r}")
    return slug


def engine_filename(gpu_name: str, trt_version: str, max_batch: int) -> str:
    """`<gpu>__trt<version>__b<max_batch>.plan`, e.g. `NVIDIA-H100-80GB-HBM3__trt10.3.0__b32.plan`."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return f"{_slug(gpu_name)}__trt{_slug(trt_version)}__b{int(max_batch)}{ENGINE_SUFFIX}"


def parse_engine_filename(filename: str) -> tuple[str, str, int] | None:
    """(gpu slug, TensorRT version slug, max batch) from an engine file name, or None if it is not one."""
    match = _ENGINE_NAME.match(filename)
    if match is None:
        return None
    return match["gpu"], match["trt"], int(match["batch"])


def find_engine(model_dir: Path, gpu_name: str, trt_version: str, max_batch: int) -> Path | None:
    """The cached plan for this GPU and TensorRT version with the smallest max batch >= `max_batch`."""
    engines_dir = Path(model_dir) / ENGINES_DIR
    if not engines_dir.is_dir():
        return None
    wanted_gpu, wanted_trt = _slug(gpu_name), _slug(trt_version)
    candidates: list[tuple[int, Path]] = []
    for plan in engines_dir.glob(f"*{ENGINE_SUFFIX}"):
        parsed = parse_engine_filename(plan.name)
        if parsed is None or not plan.is_file():
            continue
        gpu, trt, batch = parsed
        if gpu == wanted_gpu and trt == wanted_trt and batch >= max_batch:
            candidates.append((batch, plan))
    return min(candidates)[1] if candidates else None
