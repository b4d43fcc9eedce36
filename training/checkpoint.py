"""Self-describing checkpoints: tensors in `checkpoint.safetensors`, everything else in `checkpoint.json`.

No pickle anywhere: safetensors holds only raw tensors, JSON only data. The loader checks the format,
the file hash, every tensor name and shape, and names the problem when a file is wrong, truncated or
foreign.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from efficientad.errors import UserError
from efficientad.files import atomic_write, file_sha256, read_versioned_json
from training.model import MapStatistics
from training.networks import PDN, Autoencoder, ModelSize, build_networks

CHECKPOINT_FORMAT = "efficientad-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "checkpoint.safetensors"
METADATA_FILE = "checkpoint.json"
PACKAGE_VERSION = "0.1.0"


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, corrupt, foreign or of the wrong shape."""


@dataclass
class ModelConfig:
    size: ModelSize = "small"
    image_size: int = 256
    teacher_channels: int = 384
    student_channels: int = 768


@dataclass
class Checkpoint:
    config: ModelConfig
    teacher: PDN
    student: PDN
    autoencoder: Autoencoder
    stats: MapStatistics
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    @property
    def threshold(self) -> float | None:
        value = self.metadata.get("threshold")
        return None if value is None else float(value)

    def networks(self) -> tuple[PDN, PDN, Autoencoder]:
        return self.teacher, self.student, self.autoencoder


def versions() -> dict[str, str]:
    import safetensors

    return {
        "efficientad": PACKAGE_VERSION,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def _resolve(path: Path) -> tuple[Path, Path]:
    """A run dir, a .safetensors or a .json path -> (tensors file, metadata file)."""
    path = Path(path)
    if path.is_dir():
        return path / TENSORS_FILE, path / METADATA_FILE
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def save_checkpoint(
    run_dir: Path,
    *,
    config: ModelConfig,
    teacher: nn.Module,
    student: nn.Module,
    autoencoder: nn.Module,
    stats: MapStatistics,
    metadata: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `RUN_DIR/checkpoint.safetensors` + `RUN_DIR/checkpoint.json`, each atomically.

    `metadata` carries training settings, data fingerprint, split, threshold, metrics; format, model config,
    versions and the tensor file's hash are added here. Returns the tensors file.
    """
    tensors_path, metadata_path = Path(run_dir) / TENSORS_FILE, Path(run_dir) / METADATA_FILE
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("teacher", teacher), ("student", student), ("autoencoder", autoencoder)):
        for name, value in module.state_dict().items():
            tensors[f"{prefix}.{name}"] = value.detach().to("cpu", dtype).contiguous()
    for name, value in stats.as_dict().items():
        tensors[f"stats.{name}"] = value.detach().to("cpu", torch.float32).reshape(value.shape).contiguous()
    atomic_write(tensors_path, lambda temporary: save_file(tensors, str(temporary)))
    document = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "model": asdict(config),
        **(metadata or {}),
        "tensors_file": tensors_path.name,
        "tensors_sha256": file_sha256(tensors_path),
        "tensor_dtype": str(dtype).removeprefix("torch."),
        "versions": versions(),
    }
    text = json.dumps(document, indent=2, sort_keys=False, default=str)
    atomic_write(metadata_path, lambda temporary: temporary.write_text(text + "\n"))
    return tensors_path


def read_metadata(path: Path) -> dict[str, Any]:
    """The checkpoint's JSON document, checked for format and version."""
    _, metadata_path = _resolve(Path(path))
    return read_versioned_json(
        metadata_path,
        expected_format=CHECKPOINT_FORMAT,
        max_version=FORMAT_VERSION,
        error=CheckpointError,
        what="an EfficientAD checkpoint's metadata",
    )


def _load_module(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], source: Path) -> None:
    expected = module.state_dict()
    for name, reference in expected.items():
        key = f"{prefix}.{name}"
        if key not in tensors:
            raise CheckpointError(f"{source}: tensor {key!r} is missing")
        if tuple(tensors[key].shape) != tuple(reference.shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                f"expected {tuple(reference.shape)}"
            )
    module.load_state_dict({name: tensors[f"{prefix}.{name}"].float() for name in expected})


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a run dir (or its .safetensors/.json) into eval-mode networks and statistics on `device`."""
    tensors_path, _ = _resolve(Path(path))
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    document = read_metadata(path)
    if not tensors_path.is_file():
        raise CheckpointError(f"checkpoint tensors not found: {tensors_path}")
    digest = file_sha256(tensors_path)
    if document.get("tensors_sha256") not in (None, digest):
        raise CheckpointError(
            f"{tensors_path} does not match its metadata (sha256 {digest[:12]}..., expected "
            f"{str(document['tensors_sha256'])[:12]}...): the file is truncated, corrupt or from another run"
        )
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {tensors_path}: {error}") from None
    try:
        config = ModelConfig(**document["model"])
    except (KeyError, TypeError) as error:
        raise CheckpointError(
            f"{tensors_path}: model config missing or malformed in metadata ({error})"
        ) from None
    try:
        teacher, student, autoencoder = build_networks(config.size, config.image_size)
    except ValueError as error:
        raise CheckpointError(f"{tensors_path}: {error}") from None
    for prefix, module in (("teacher", teacher), ("student", student), ("autoencoder", autoencoder)):
        _load_module(module, prefix, tensors, tensors_path)
    stats_values = {}
    for name in MapStatistics.TENSOR_NAMES:
        key = f"stats.{name}"
        if key not in tensors:
            raise CheckpointError(f"{tensors_path}: statistics tensor {key!r} is missing")
        stats_values[name] = tensors[key].float().to(device)
    if stats_values["teacher_mean"].shape != (config.teacher_channels,):
        raise CheckpointError(
            f"{tensors_path}: stats.teacher_mean has shape {tuple(stats_values['teacher_mean'].shape)}"
        )
    for module in (teacher, student, autoencoder):
        module.to(device).eval()
    return Checkpoint(
        config=config,
        teacher=teacher,
        student=student,
        autoencoder=autoencoder,
        stats=MapStatistics(**stats_values),
        metadata=document,
        sha256=digest,
    )
