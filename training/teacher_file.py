"""The distilled teacher on disk: one `.safetensors` file, weights `teacher.<param>`, metadata in its header.

Made by `efficientad distill`, read by `efficientad train`. No pickle: loading never executes code. The
header carries "format": "efficientad-teacher", the PDN "size" and provenance (backbone, steps, data).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from efficientad.files import atomic_write
from training.checkpoint import CheckpointError
from training.networks import PDN, TEACHER_CHANNELS

TEACHER_FORMAT = "efficientad-teacher"
TEACHER_FORMAT_VERSION = "1"
DEFAULT_TEACHER_PATH = Path(__file__).parent / "assets" / "teacher_small.safetensors"
_PREFIX = "teacher."


def _as_text(value: Any) -> str:
    """Header values must be strings: text as is, containers as JSON, anything else through str()."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def save_teacher(path: Path, teacher: PDN, metadata: dict[str, str]) -> None:
    """Write the teacher's weights (float32) and `metadata` to `path`, atomically.

    A teacher trained with padding (distillation) has the same weights as the unpadded one used later.
    """
    path = Path(path)
    if teacher.out_channels != TEACHER_CHANNELS:
        raise ValueError(
            f"a teacher has {TEACHER_CHANNELS} output channels, this PDN has {teacher.out_channels}"
        )
    tensors = {
        f"{_PREFIX}{name}": value.detach().to("cpu", torch.float32).contiguous()
        for name, value in teacher.state_dict().items()
    }
    header = {key: _as_text(value) for key, value in metadata.items()}
    header.update(format=TEACHER_FORMAT, format_version=TEACHER_FORMAT_VERSION, size=teacher.size)
    atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=header))


def load_teacher(path: Path) -> tuple[PDN, dict[str, str]]:
    """Read a teacher file into an unpadded PDN in eval mode (on the CPU) and return it with its metadata.

    Raises CheckpointError naming the path when the file is missing, truncated, not safetensors, not a
    teacher file, or holds tensors of the wrong names or shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"teacher weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            if metadata.get("format") != TEACHER_FORMAT:
                raise CheckpointError(
                    f'not an EfficientAD teacher file (no "format": "{TEACHER_FORMAT}" in its header): {path}'
                )
            size = metadata.get("size")
            if size not in ("small", "medium"):
                raise CheckpointError(f"teacher file {path} names an unknown PDN size {size!r}")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open API)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read teacher file {path} (truncated, corrupt or not a safetensors file): {error}"
        ) from None
    teacher = PDN(size=size, out_channels=TEACHER_CHANNELS, padding=False)
    expected = teacher.state_dict()
    weights = {}
    for name, reference in expected.items():
        key = f"{_PREFIX}{name}"
        if key not in tensors:
            raise CheckpointError(f"{path}: tensor {key!r} is missing")
        if tuple(tensors[key].shape) != tuple(reference.shape):
            shape, wanted = tuple(tensors[key].shape), tuple(reference.shape)
            raise CheckpointError(f"{path}: tensor {key!r} has shape {shape}, expected {wanted}")
        weights[name] = tensors[key].float()
    unexpected = sorted(set(tensors) - {f"{_PREFIX}{name}" for name in expected})
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected tensors for a PDN-{size[0].upper()} teacher: {unexpected[:5]}"
        )
    teacher.load_state_dict(weights)
    return teacher.eval(), metadata
