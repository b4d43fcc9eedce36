"""Parity checks at export time, on real images: a failed check fails the export.

1. ONNX Runtime (CPU) on `model.onnx` vs the PyTorch EfficientAD module (`training.model`, as trained and
   evaluated) on the same uint8 images, through the graph at batch N and batch 1: this covers the uint8
   input, the folded teacher normalisation and the export itself;
2. the graph's `score` vs the max of its own `anomaly_map`, and identical decisions at the threshold.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from efficientad.errors import UserError
from efficientad.model_dir import INPUT_NAME
from training.checkpoint import Checkpoint
from training.images import IMAGE_SUFFIXES, load_image_tensor
from training.model import EfficientAD, imagenet_normalise

logger = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples" / "cookie" / "test"
MAX_DEFAULT_IMAGES = 10
ABSOLUTE_TOLERANCE = 1e-4  # on the map at fp32; scaled up for maps whose values exceed 1


class ParityError(UserError):
    """The exported graph does not compute what the checkpoint computes; nothing is written."""


@dataclass
class ParityReport:
    images: list[str]
    tolerance: float
    onnxruntime_vs_pytorch_map: dict[str, float]  # "batch N" -> max |ORT - PyTorch module|
    onnxruntime_vs_pytorch_score: dict[str, float]
    score_vs_map_max: float  # max |score - max(anomaly_map)| in the ORT output
    threshold: float | None
    decisions_identical: bool | None
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_parity_images() -> list[Path]:
    """The bundled real images (samples/cookie/test, good and anomalous), when this is a source checkout."""
    if not SAMPLES_DIR.is_dir():
        return []
    images = sorted(p for p in SAMPLES_DIR.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return images[:MAX_DEFAULT_IMAGES]


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """Image files -> (N, 3, size, size) uint8 RGB."""
    if not paths:
        raise ParityError("no parity images given (pass image files or a folder of images)")
    return torch.stack([load_image_tensor(Path(p), size) for p in paths])


def onnxruntime_session(onnx_path: Path, threads: int = 0) -> Any:
    """A CPU ONNX Runtime session on the graph (all graph optimisations on)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _max_abs(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Largest absolute difference; infinite when either side holds NaN or inf (never a silent pass)."""
    difference = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return float(np.max(difference)) if np.all(np.isfinite(difference)) else float("inf")


@torch.no_grad()
def check_parity(
    checkpoint: Checkpoint, onnx_path: Path, images: torch.Tensor, image_names: list[str]
) -> ParityReport:
    """Both checks on `images` (N, 3, S, S) uint8; a ParityError naming the differences on failure."""
    model = EfficientAD.from_checkpoint(checkpoint).cpu().eval()
    reference_map, reference_score = model(imagenet_normalise(images))  # (N, 1, S, S), (N,)
    tolerance = ABSOLUTE_TOLERANCE * max(1.0, float(reference_map.abs().max()))

    session = onnxruntime_session(onnx_path)
    batch = images.numpy()
    ort_maps: dict[str, float] = {}
    ort_scores: dict[str, float] = {}
    score_vs_max = 0.0
    runs = {f"batch {len(batch)}": list(range(len(batch))), "batch 1 (first image)": [0]}
    if len(batch) > 1:
        runs["batch 1 (last image)"] = [len(batch) - 1]
    ort_full_scores = None
    for label, indices in runs.items():
        onnx_map, onnx_score = session.run(None, {INPUT_NAME: batch[indices]})  # (n, 1, S, S), (n,)
        ort_maps[label] = _max_abs(onnx_map, reference_map[indices].numpy())
        ort_scores[label] = _max_abs(onnx_score, reference_score[indices].numpy())
        score_vs_max = max(score_vs_max, _max_abs(onnx_score, onnx_map.reshape(len(indices), -1).max(axis=1)))
        if ort_full_scores is None:
            ort_full_scores = onnx_score

    threshold = checkpoint.threshold
    decisions_identical = None
    if threshold is not None and ort_full_scores is not None:
        clear_of_threshold = np.abs(reference_score.numpy() - threshold) > tolerance
        same = (ort_full_scores >= threshold) == (reference_score.numpy() >= threshold)
        decisions_identical = bool(np.all(same | ~clear_of_threshold))

    report = ParityReport(
        images=list(image_names),
        tolerance=tolerance,
        onnxruntime_vs_pytorch_map=ort_maps,
        onnxruntime_vs_pytorch_score=ort_scores,
        score_vs_map_max=score_vs_max,
        threshold=threshold,
        decisions_identical=decisions_identical,
        passed=False,
    )
    failures = []
    if not (torch.isfinite(reference_map).all() and torch.isfinite(reference_score).all()):
        failures.append("the PyTorch module produced NaN or infinite values (degenerate map statistics?)")
    for label in ort_maps:
        if ort_maps[label] > tolerance or ort_scores[label] > tolerance:
            failures.append(
                f"ONNX Runtime vs the PyTorch module at {label}: max |map diff| {ort_maps[label]:.3g}, "
                f"max |score diff| {ort_scores[label]:.3g}"
            )
    if score_vs_max > tolerance:
        failures.append(f"graph score differs from the max of its map by {score_vs_max:.3g}")
    if decisions_identical is False:
        failures.append(f"decisions at threshold {threshold} differ between ONNX Runtime and PyTorch")
    logger.info(
        "parity on %d images: ORT vs PyTorch map %s, score vs max %.3g (tol %.3g)",
        len(images),
        {k: f"{v:.3g}" for k, v in ort_maps.items()},
        score_vs_max,
        tolerance,
    )
    if failures:
        raise ParityError(f"parity check failed (tolerance {tolerance:.3g}): " + "; ".join(failures))
    report.passed = True
    return report
