"""Evaluation on DATA_DIR/test: image AUROC, pixel AUROC and AU-PRO (FPR <= 0.3), per defect type and overall.

Per defect type the metrics use the good test images plus that type's images; overall uses all of them.
Pixel metrics use only images with a mask (good images count with all-zero masks; anomalies without a
mask count for the image AUROC only). Maps and masks are compared at the model's input size.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from efficientad.scores import detection_rate, false_alarm_rate, image_auroc
from training.data import EvaluationData, load_test_set, scan_category
from training.images import DataError
from training.model import EfficientAD, imagenet_normalise

logger = logging.getLogger(__name__)

FPR_LIMIT = 0.3
EVAL_BATCH_SIZE = 16


@torch.no_grad()
def predict_maps(
    model: EfficientAD, images: torch.Tensor, device: torch.device, *, batch_size: int = EVAL_BATCH_SIZE
) -> tuple[np.ndarray, np.ndarray, float]:
    """(N, 3, S, S) uint8 -> (maps (N, S, S) float32, scores (N,), images/s of the forward passes)."""
    model.eval()
    model(imagenet_normalise(images[:1].to(device)))  # warm-up
    maps, scores, seconds = [], [], 0.0
    for start in tqdm(
        range(0, images.shape[0], batch_size), desc="evaluating", unit="batch", leave=False, disable=None
    ):
        batch = images[start : start + batch_size]
        _synchronize(device)
        began = time.perf_counter()
        batch_map, batch_score = model(imagenet_normalise(batch.to(device)))  # (B, 1, S, S), (B,)
        _synchronize(device)
        seconds += time.perf_counter() - began
        maps.append(batch_map[:, 0].float().cpu().numpy())  # (B, S, S)
        scores.append(batch_score.float().cpu().numpy())  # (B,)
    return np.concatenate(maps), np.concatenate(scores), images.shape[0] / max(seconds, 1e-9)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _subset_metrics(
    labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray, has_mask: np.ndarray
) -> dict[str, Any]:
    """Metrics of one subset; a metric is None when the subset cannot define it (e.g. no anomalous pixel)."""
    from training.metrics import au_pro, pixel_auroc

    both_classes = labels.any() and not labels.all()
    pixel_masks, pixel_maps = masks[has_mask], maps[has_mask]
    has_pixels = pixel_masks.any() and not pixel_masks.all()
    return {
        "image_auroc": image_auroc(labels, scores) if both_classes else None,
        "pixel_auroc": pixel_auroc(pixel_masks, pixel_maps) if has_pixels else None,
        "au_pro": au_pro(pixel_masks, pixel_maps, fpr_limit=FPR_LIMIT) if has_pixels else None,
        "images": int(labels.size),
        "anomalous_images": int(labels.sum()),
        "images_with_masks": int((has_mask & labels).sum()),
    }


def metrics_from_maps(test_set: EvaluationData, maps: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """{"overall": {...}, "per_defect": {defect: {...}}} for maps (N, S, S) and scores (N,)."""
    defects = np.array(test_set.defects)
    per_defect = {}
    for defect in sorted(set(test_set.defects) - {"good"}):
        chosen = (defects == defect) | ~test_set.labels
        per_defect[defect] = _subset_metrics(
            test_set.labels[chosen],
            scores[chosen],
            test_set.masks[chosen],
            maps[chosen],
            test_set.has_mask[chosen],
        )
    overall = _subset_metrics(test_set.labels, scores, test_set.masks, maps, test_set.has_mask)
    return {"overall": overall, "per_defect": per_defect}


def evaluate_model(model: EfficientAD, test_set: EvaluationData, device: torch.device) -> dict[str, Any]:
    """Metrics of an in-memory model on a decoded test set, plus images/s."""
    maps, scores, images_per_second = predict_maps(model, test_set.images, device)
    result = metrics_from_maps(test_set, maps, scores)
    result.update(
        {
            "fpr_limit": FPR_LIMIT,
            "images_per_second": images_per_second,
            "batch_size": EVAL_BATCH_SIZE,
            "device": str(device),
            "image_size": int(test_set.images.shape[-1]),
            "scores": {name: float(score) for name, score in zip(test_set.names, scores, strict=True)},
        }
    )
    return result


def evaluate(run_dir: Path, data_dir: Path, device: str = "auto") -> dict[str, Any]:
    """Load the checkpoint in `run_dir` and evaluate it on `data_dir`/test."""
    from training.checkpoint import load_checkpoint
    from training.device import resolve_device

    torch_device = resolve_device(device)
    checkpoint = load_checkpoint(Path(run_dir), torch_device)
    category = scan_category(Path(data_dir))
    if not category.has_test:
        raise DataError(f"no test images to evaluate: {Path(data_dir) / 'test'} not found")
    test_set = load_test_set(category, checkpoint.config.image_size)
    result = evaluate_model(EfficientAD.from_checkpoint(checkpoint), test_set, torch_device)
    if checkpoint.threshold is not None:
        result.update(threshold_rates(test_set.labels, result["scores"], checkpoint.threshold))
    result["run_dir"] = str(run_dir)
    result["data_dir"] = str(data_dir)
    result["checkpoint_sha256"] = checkpoint.sha256
    return result


def threshold_rates(labels: np.ndarray, scores: dict[str, float], threshold: float) -> dict[str, Any]:
    """How the model's own threshold does on the test set: accuracy, detection and false-alarm rates."""
    values = np.array(list(scores.values()))  # (N,) in the test set's order
    return {
        "threshold": threshold,
        "threshold_accuracy": float(np.mean((values > threshold) == labels)),
        "threshold_detection_rate": detection_rate(values[labels], threshold),
        "threshold_false_alarm_rate": false_alarm_rate(values[~labels], threshold),
        "defects_caught": int(np.sum(values[labels] > threshold)),
        "good_flagged": int(np.sum(values[~labels] > threshold)),
    }


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a plain-text table, one row per defect type and one overall."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    header = f"{'defect':<20} {'images':>6} {'image AUROC':>11} {'pixel AUROC':>11} {'AU-PRO@0.3':>10}"
    rows = [header, "-" * len(header)]
    entries = [*result["per_defect"].items(), ("overall", result["overall"])]
    for name, metrics in entries:
        rows.append(
            f"{name:<20} {metrics['images']:>6} {cell(metrics['image_auroc']):>11} "
            f"{cell(metrics['pixel_auroc']):>11} {cell(metrics['au_pro']):>10}"
        )
    rows.append(
        f"{result['images_per_second']:.1f} images/s on {result['device']} (batch {result['batch_size']})"
    )
    return "\n".join(rows)
