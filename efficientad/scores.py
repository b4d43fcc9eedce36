"""Score math shared by training, evaluation and `efficientad calibrate` (numpy only, torch-free).

- `roc_auc` / `image_auroc`: area under the ROC curve. The scores are sorted once and the curve is read off
  cumulative sums; ties count as in scikit-learn's `roc_auc_score` (samples with the same score cross the
  threshold together: a trapezoid segment, i.e. a tied pair counts half).
- Thresholds: the server flags `score > threshold`. `threshold_for_false_alarm_rate` picks the smallest
  good score t with at most a fraction r of the good scores above it (with the N good scores sorted
  ascending s_1..s_N, t = s_k, k = ceil(N (1 - r))); fewer than 1/r good images cannot resolve r, and
  the threshold is then the largest good score.
- `false_alarm_rate`, `miss_rate`, `detection_rate` at a threshold.
- `default_threshold`: the rule a freshly trained model's threshold comes from (`DEFAULT_THRESHOLD_RULE`):
  the 0.9 quantile of the validation scores plus a margin of 0.1, one unit of the normalised map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

ArrayLike = Sequence[float] | np.ndarray

DEFAULT_FALSE_ALARM_RATE = 0.005  # the default threshold's target: 1 good image in 200 flagged
DEFAULT_THRESHOLD_QUANTILE = 0.9  # of the held-out good scores (linear interpolation between them)
DEFAULT_THRESHOLD_MARGIN = 0.1  # one unit of the normalised map (a good map's 0.995 quantile reads 0.1)
DEFAULT_THRESHOLD_RULE = (
    "the 0.9 quantile of the final anomaly scores of the validation images (good images held out of "
    "train/good), linearly interpolated, plus 0.1 (one unit of the normalised map)"
)


def as_float(values: ArrayLike) -> np.ndarray:
    """Float scores as given (float32 sorts faster than float64 and keeps the order); others to float64."""
    values = np.asarray(values)
    return values if values.dtype.kind == "f" else values.astype(np.float64)


def check_finite(values: np.ndarray, name: str) -> None:
    """A ValueError naming `name` when `values` holds NaN or infinity."""
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contain NaN or infinite values")


def descending_threshold_ends(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort order (highest score first) and, in that order, the last index of each run of equal scores."""
    order = np.argsort(scores, kind="stable")[::-1]  # (M,)
    sorted_scores = scores[order]
    ends = np.flatnonzero(np.diff(sorted_scores))  # last index before the score changes
    return order, np.append(ends, sorted_scores.size - 1)


def trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    """Area under the piecewise-linear curve through (x, y)."""
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) * 0.5))


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of flat boolean labels (True = anomalous) against flat scores."""
    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = as_float(scores).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels have {labels.size} values but scores have {scores.size}")
    check_finite(scores, "scores")
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUROC needs both normal and anomalous samples; only one class is present")
    order, ends = descending_threshold_ends(scores)
    true_positives = np.cumsum(labels[order], dtype=np.int64)[ends]  # at each distinct threshold
    false_positives = (ends + 1) - true_positives
    tpr = np.concatenate(([0.0], true_positives / positives))
    fpr = np.concatenate(([0.0], false_positives / negatives))
    return trapezoid(fpr, tpr)


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level AUROC: `labels` (N,) bool, True = anomalous; `scores` (N,) higher = more anomalous."""
    return roc_auc(labels, scores)


def labelled(good_scores: ArrayLike, defect_scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N0 + N1,) bool, scores (N0 + N1,) float64) from the good and the defect scores."""
    good = np.asarray(good_scores, dtype=np.float64).reshape(-1)
    defects = np.asarray(defect_scores, dtype=np.float64).reshape(-1)
    labels = np.concatenate([np.zeros(good.size, dtype=bool), np.ones(defects.size, dtype=bool)])
    return labels, np.concatenate([good, defects])


def exact_rate(rate: float) -> Fraction:
    """The rate as the decimal it was written as (0.01 -> 1/100), so N * rate has no rounding error."""
    rate = float(rate)
    if not (math.isfinite(rate) and 0 <= rate < 1):
        raise ValueError(f"the false-alarm rate must be at least 0 and below 1, got {rate}")
    return Fraction(repr(rate))


def rate_is_resolvable(count: int, rate: float) -> bool:
    """Whether `count` good images can resolve `rate`: count >= 1 / rate (one image is 1/count of them)."""
    return count * exact_rate(rate) >= 1


def images_needed(rate: float) -> int | None:
    """The fewest good images that resolve `rate` (ceil(1 / rate)); None for 0, which no count resolves."""
    exact = exact_rate(rate)
    return math.ceil(1 / exact) if exact else None


def threshold_for_false_alarm_rate(scores: ArrayLike, rate: float) -> float:
    """s_k of the sorted good scores, k = max(1, ceil(N (1 - rate))): the smallest score t with at most
    a fraction `rate` of the scores above t."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))  # (N,)
    if ordered.size == 0:
        raise ValueError("no scores: a threshold needs at least one good image")
    k = max(1, math.ceil(ordered.size * (1 - exact_rate(rate))))
    return float(ordered[k - 1])


def false_alarm_rate(good_scores: ArrayLike, threshold: float) -> float:
    """The fraction of good scores the server would flag (score > threshold)."""
    scores = np.asarray(good_scores, dtype=np.float64)
    return float(np.mean(scores > threshold)) if scores.size else 0.0


def miss_rate(defect_scores: ArrayLike, threshold: float) -> float:
    """The fraction of defect scores the server would pass (score <= threshold)."""
    scores = np.asarray(defect_scores, dtype=np.float64)
    return float(np.mean(scores <= threshold)) if scores.size else 0.0


def detection_rate(defect_scores: ArrayLike, threshold: float) -> float:
    """The fraction of defect scores the server would flag (score > threshold): 1 - miss rate."""
    scores = np.asarray(defect_scores, dtype=np.float64)
    return float(np.mean(scores > threshold)) if scores.size else 0.0


def default_threshold(validation_scores: ArrayLike) -> float:
    """The threshold of a freshly trained model by `DEFAULT_THRESHOLD_RULE`.

    Why not the largest validation score: with the few held-out images a line has (3 of 31 cookie photos)
    the max is one draw of the tail, too low when the held-out images happen to be easy (half the good
    test photos flagged). Why not a fitted tail (a log-normal's 0.995 quantile, the rule before this one):
    on 3 to 30 scores the fit's spread swings with one score near 0 (one cookie run's threshold moved
    0.30 -> 0.46 -> 3.8 between evaluations). A quantile is robust to one odd score at either end, and the
    margin is in the map's own unit: the map is normalised so that the 0.995 quantile of the good maps'
    values reads 0.1 (training.statistics), and a defect adds at least that much where it lies. Chosen on
    the labelled test photos of cookie and elpv (docs/training.md, "What it writes"), the only labelled
    data there is. `efficientad calibrate` sets a threshold from a line's own good images.
    """
    scores = np.asarray(validation_scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError("no validation scores: a threshold needs at least one held-out good image")
    check_finite(scores, "validation scores")
    return float(np.quantile(scores, DEFAULT_THRESHOLD_QUANTILE)) + DEFAULT_THRESHOLD_MARGIN
