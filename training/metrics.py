"""Anomaly-detection metrics: image AUROC, pixel AUROC and AU-PRO (the MVTec AD protocol).

All three sort the scores once and read the curves off cumulative sums, so 100 maps of 256x256 take about
a second. Ties count as in scikit-learn's `roc_auc_score`: all samples with the same score cross the
threshold together, which joins the curve points by a straight (trapezoid) segment.
"""

from __future__ import annotations

import numpy as np


def _check_finite(values: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contain NaN or infinite values")


def _as_float(values: np.ndarray) -> np.ndarray:
    """Float scores as given (float32 sorts faster than float64 and keeps the order); others to float64."""
    values = np.asarray(values)
    return values if values.dtype.kind == "f" else values.astype(np.float64)


def _descending_threshold_ends(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort order (highest score first) and, in that order, the last index of each run of equal scores."""
    order = np.argsort(scores, kind="stable")[::-1]  # (M,)
    sorted_scores = scores[order]
    ends = np.flatnonzero(np.diff(sorted_scores))  # last index before the score changes
    return order, np.append(ends, sorted_scores.size - 1)


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) * 0.5))


def _roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of flat boolean labels against flat scores."""
    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = _as_float(scores).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels have {labels.size} values but scores have {scores.size}")
    _check_finite(scores, "scores")
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUROC needs both normal and anomalous samples; only one class is present")
    order, ends = _descending_threshold_ends(scores)
    true_positives = np.cumsum(labels[order], dtype=np.int64)[ends]  # at each distinct threshold
    false_positives = (ends + 1) - true_positives
    tpr = np.concatenate(([0.0], true_positives / positives))
    fpr = np.concatenate(([0.0], false_positives / negatives))
    return _trapezoid(fpr, tpr)


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level AUROC: `labels` (N,) bool, True = anomalous; `scores` (N,) higher = more anomalous."""
    return _roc_auc(labels, scores)


def _check_maps(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(
            f"masks and maps must both be (N, H, W) and of the same shape, got {masks.shape} and {maps.shape}"
        )
    return masks, maps


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level AUROC over all pixels of all images: `masks` (N,H,W) bool, `maps` (N,H,W) scores."""
    masks, maps = _check_maps(masks, maps)
    return _roc_auc(masks, maps)


def _connected_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Label each 8-connected defect region of each image: (N,H,W) int with 0 = normal, and the count."""
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected within an image, never across images
    labels, count = ndimage.label(masks, structure=structure)
    return labels, int(count)


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve: (FPR, PRO) at every distinct threshold, from (0, 0) to (1, 1).

    PRO at a threshold = mean over all defect regions (connected components of the masks) of the fraction of
    the region's pixels scoring at or above it; FPR = fraction of all normal pixels scoring at or above it.
    """
    masks, maps = _check_maps(masks, maps)
    scores = _as_float(maps).reshape(-1)
    _check_finite(scores, "maps")
    regions, region_count = _connected_regions(masks)
    regions = regions.reshape(-1)
    normal = ~masks.reshape(-1)
    normal_count = int(normal.sum())
    if region_count == 0:
        raise ValueError("AU-PRO needs at least one anomalous pixel in the masks")
    if normal_count == 0:
        raise ValueError("AU-PRO needs at least one normal pixel in the masks")
    region_sizes = np.bincount(regions, minlength=region_count + 1)
    # Each pixel of region k moves PRO by 1 / (size_k * K) when it crosses the threshold; normal pixels by 0.
    weights = np.zeros(region_count + 1)
    weights[1:] = 1.0 / (region_sizes[1:] * region_count)
    order, ends = _descending_threshold_ends(scores)
    false_positives = np.cumsum(normal[order], dtype=np.int64)[ends]
    overlap = np.cumsum(weights[regions[order]])[ends]
    fpr = np.concatenate(([0.0], false_positives / normal_count, [1.0]))
    pro = np.concatenate(([0.0], np.minimum(overlap, 1.0), [1.0]))
    return fpr, pro


def au_pro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit (so in [0, 1]).

    The curve is cut at exactly fpr_limit, with PRO interpolated linearly between the neighbouring points.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps)
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:inside] <= fpr_limit (fpr is sorted)
    x, y = fpr[:inside], pro[:inside]
    if inside < fpr.size and x[-1] < fpr_limit:
        step = (fpr_limit - x[-1]) / (fpr[inside] - x[-1])
        x = np.append(x, fpr_limit)
        y = np.append(y, y[-1] + step * (pro[inside] - y[-1]))
    return _trapezoid(x, y) / fpr_limit
