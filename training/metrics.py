"""Anomaly-detection metrics: image AUROC, pixel AUROC and AU-PRO (the MVTec AD protocol).

The ROC math and the image AUROC are the core's (`efficientad.scores`); this module adds the pixel-level
metrics. Both sort the scores once and read the curves off cumulative sums, so 100 maps of 256x256 take
about a second. Ties count as in scikit-learn's `roc_auc_score`: all samples with the same score cross the
threshold together, which joins the curve points by a straight (trapezoid) segment.
"""

from __future__ import annotations

import numpy as np

from efficientad.scores import (
    as_float,
    check_finite,
    descending_threshold_ends,
    roc_auc,
    trapezoid,
)


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
    return roc_auc(masks, maps)


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
    scores = as_float(maps).reshape(-1)
    check_finite(scores, "maps")
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
    order, ends = descending_threshold_ends(scores)
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
    return trapezoid(x, y) / fpr_limit
