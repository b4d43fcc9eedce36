"""The model to benchmark: a given model dir / run dir, or a random-weight one made on the spot.

Random weights time exactly like trained ones (same graph, same shapes); the report says which it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficientad.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_FILES = ("checkpoint.safetensors", "checkpoint.json")


@dataclass(frozen=True)
class BenchModel:
    model_dir: Path  # model.onnx + model.json
    run_dir: Path | None  # the checkpoint, for the PyTorch baselines (None: PyTorch rows are skipped)
    model_size: str  # "small" | "medium"
    input_height: int
    input_width: int
    threshold: float | None
    random_weights: bool
    version: str  # model.onnx sha256 prefix
    info: Any = field(repr=False, compare=False)  # efficientad.model_dir.ModelInfo, for the server's backends

    def describe(self) -> dict[str, Any]:
        return {
            "dir": str(self.model_dir),
            "run_dir": None if self.run_dir is None else str(self.run_dir),
            "size": self.model_size,
            "input_height": self.input_height,
            "input_width": self.input_width,
            "threshold": self.threshold,
            "weights": "random" if self.random_weights else "trained",
            "version": self.version,
        }


def _has_checkpoint(run_dir: Path) -> bool:
    return all((run_dir / name).is_file() for name in CHECKPOINT_FILES)


def _checkpoint_is_random(run_dir: Path) -> bool:
    try:
        document = json.loads((run_dir / "checkpoint.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    teacher = document.get("teacher")
    return isinstance(teacher, dict) and bool(teacher.get("random"))


def make_random_run(run_dir: Path, *, model_size: str, image_size: int, seed: int = 0) -> Path:
    """A checkpoint with random-init networks and identity map statistics (for timing only)."""
    import torch

    from training.checkpoint import ModelConfig, save_checkpoint
    from training.model import MapStatistics
    from training.networks import build_networks

    torch.manual_seed(seed)
    teacher, student, autoencoder = build_networks(model_size, image_size)  # type: ignore[arg-type]
    save_checkpoint(
        run_dir,
        config=ModelConfig(size=model_size, image_size=image_size),  # type: ignore[arg-type]
        teacher=teacher,
        student=student,
        autoencoder=autoencoder,
        stats=MapStatistics.identity(),
        metadata={"threshold": 0.1, "teacher": {"source": "random", "random": True}, "purpose": "benchmark"},
    )
    return run_dir


GRAPH_SOURCES = (
    "training/networks.py",
    "training/model.py",
    "export/fused.py",
    "export/onnx_export.py",
)


def random_model_key(model_size: str, image_size: int) -> str:
    """A cache key for a random-weight model: size, input side and a digest of the code that makes the graph
    (a change to the networks or the export invalidates cached models)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in GRAPH_SOURCES:
        path = root / name
        digest.update(path.read_bytes() if path.is_file() else name.encode())
    return f"random-{model_size}-{image_size}px-{digest.hexdigest()[:12]}"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "efficientad" / "bench"


def _cached_random_model(cache_dir: Path, model_size: str, image_size: int) -> tuple[Path, Path]:
    """(run dir, model dir) of a random-weight model in `cache_dir`, made and exported on first use."""
    from efficientad.model_dir import ModelDirError, read_model_dir

    entry = cache_dir / random_model_key(model_size, image_size)
    run_dir, model_dir = entry / "run", entry / "model"
    try:
        if _has_checkpoint(run_dir):
            read_model_dir(model_dir)
            logger.info("using cached random-weight model %s", entry)
            return run_dir, model_dir
    except ModelDirError:
        pass
    make_random_run(run_dir, model_size=model_size, image_size=image_size)
    _export(run_dir, model_dir)
    return run_dir, model_dir


def _export(run_dir: Path, model_dir: Path) -> None:
    from export.exporter import export_model

    logger.info("exporting %s to %s", run_dir, model_dir)
    export_model(run_dir, model_dir, force=True)


def prepare_model(
    *,
    model_dir: Path | None,
    run_dir: Path | None,
    work_dir: Path,
    model_size: str,
    image_size: int,
    cache_dir: Path | None = None,
) -> BenchModel:
    """Resolve what to benchmark; writes anything it creates under `work_dir`.

    - `model_dir` given: benchmark it (plus `run_dir`'s checkpoint for the PyTorch rows, when given).
    - only `run_dir` given: export it into `work_dir/model`.
    - neither: a random-weight PDN-`model_size` checkpoint at `image_size`, exported into `cache_dir`
      (reused by later runs) or, without a cache dir, into `work_dir`.
    """
    from efficientad.model_dir import read_model_dir

    if run_dir is not None:
        run_dir = Path(run_dir)
        if not _has_checkpoint(run_dir):
            raise UserError(f"--run-dir {run_dir} holds no checkpoint ({' + '.join(CHECKPOINT_FILES)})")
    if model_dir is None and run_dir is None and cache_dir is not None:
        run_dir, model_dir = _cached_random_model(Path(cache_dir), model_size, image_size)
    elif model_dir is None:
        if run_dir is None:
            run_dir = make_random_run(work_dir / "run", model_size=model_size, image_size=image_size)
        model_dir = work_dir / "model"
        _export(run_dir, model_dir)
    info = read_model_dir(Path(model_dir))
    checkpoint_meta = info.metadata.get("checkpoint") if isinstance(info.metadata, dict) else None
    checkpoint_meta = checkpoint_meta if isinstance(checkpoint_meta, dict) else {}
    if run_dir is None:
        source = checkpoint_meta.get("source")
        if source and _has_checkpoint(Path(source)):
            run_dir = Path(source)
            logger.info("PyTorch rows use the checkpoint the model was exported from: %s", run_dir)
        else:
            logger.warning(
                "no --run-dir given: the PyTorch baseline rows need the checkpoint and are skipped"
            )
    random_weights = bool(checkpoint_meta.get("teacher_random")) or (
        run_dir is not None and _checkpoint_is_random(run_dir)
    )
    return BenchModel(
        model_dir=Path(model_dir),
        run_dir=run_dir,
        model_size=info.model_size,
        input_height=info.input_height,
        input_width=info.input_width,
        threshold=info.threshold,
        random_weights=random_weights,
        version=info.version,
        info=info,
    )
