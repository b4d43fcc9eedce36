"""Metrics against scikit-learn (AUROC), a hand-worked AU-PRO case and a slow direct AU-PRO reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from efficientad.scores import image_auroc
from training.metrics import au_pro, pixel_auroc, pro_curve


def test_image_auroc_equals_sklearn_on_random_scores() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = rng.normal(size=300) + labels * 0.8
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_equals_sklearn_with_many_ties() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(500) < 0.4
    scores = rng.integers(0, 4, size=500) + labels  # only 5 distinct values
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # all scores equal: the ROC is the diagonal
    assert image_auroc(labels, np.zeros(500)) == pytest.approx(0.5)


def test_image_auroc_perfect_inverted_and_one_class() -> None:
    labels = np.array([False, False, True, True, False])
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.3])
    assert image_auroc(labels, scores) == 1.0
    assert image_auroc(labels, -scores) == 0.0
    with pytest.raises(ValueError, match="one class"):
        image_auroc(np.zeros(4, dtype=bool), np.arange(4.0))
    with pytest.raises(ValueError, match="NaN"):
        image_auroc(labels, np.array([0.1, np.nan, 0.9, 0.8, 0.3]))


def test_pixel_auroc_equals_sklearn_on_tied_maps() -> None:
    rng = np.random.default_rng(2)
    masks = np.zeros((6, 32, 32), dtype=bool)
    masks[1, 4:12, 5:20] = True
    masks[3, 20:30, 2:9] = True
    maps = np.round(rng.random(masks.shape) + masks * 0.4, 1).astype(np.float32)  # ties
    expected = roc_auc_score(masks.reshape(-1), maps.reshape(-1))
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        pixel_auroc(masks, maps[:, :16])


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    masks = np.array(
        [
            [[0, 0, 0], [1, 1, 0]],  # region A: 2 pixels in the bottom row
            [
                [1, 0, 0],
                [0, 0, 0],
            ],  # region B: 1 pixel; touches A only if images were (wrongly) stacked in 3D
        ],
        dtype=bool,
    )
    maps = np.array(
        [
            [[0.1, 0.2, 0.8], [0.9, 0.5, 0.4]],
            [[0.7, 0.5, 0.05], [0.6, 0.0, 0.15]],
        ]
    )
    return masks, maps


def test_au_pro_hand_worked_case() -> None:
    masks, maps = hand_case()
    # 9 normal pixels; regions A (2 px) and B (1 px). Thresholds from the top:
    #   0.9: A half covered           -> FPR 0,   PRO (1/2 + 0)/2 = 0.25
    #   0.8: a normal pixel           -> FPR 1/9, PRO 0.25
    #   0.7: B covered                -> FPR 1/9, PRO (1/2 + 1)/2 = 0.75
    #   0.6: a normal pixel           -> FPR 2/9, PRO 0.75
    #   0.5: A's 2nd pixel ties with a normal pixel -> one step to FPR 3/9, PRO 1 (a straight segment)
    # Up to FPR 0.3: PRO at 0.3 on that segment = 0.75 + (0.3 - 2/9) / (1/9) * 0.25 = 0.925.
    # Area = 0.25 * 1/9 + 0.75 * 1/9 + (0.75 + 0.925) / 2 * (0.3 - 2/9)
    #      = 1/36 + 1/12 + 0.8375 * 7/90 = 0.17625
    # AU-PRO = 0.17625 / 0.3 = 0.5875
    assert au_pro(masks, maps, fpr_limit=0.3) == pytest.approx(0.5875, abs=1e-12)
    fpr, pro = pro_curve(masks, maps)
    assert fpr[:6] == pytest.approx([0, 0, 1 / 9, 1 / 9, 2 / 9, 3 / 9])
    assert pro[:6] == pytest.approx([0, 0.25, 0.25, 0.75, 0.75, 1.0])
    assert (fpr[-1], pro[-1]) == (1.0, 1.0)


def test_au_pro_tie_between_normal_and_defect_pixels_is_a_straight_segment() -> None:
    masks = np.array([[[1, 0, 1, 0]]], dtype=bool)  # two 1-px regions (not adjacent), two normal pixels
    maps = np.array([[[0.5, 0.5, 0.2, 0.1]]])
    # 0.5: region 1 and one normal pixel together -> (FPR 1/2, PRO 1/2); the curve is the diagonal there.
    # Up to 0.3: triangle 0.3 * 0.3 / 2 = 0.045 -> 0.045 / 0.3 = 0.15
    assert au_pro(masks, maps, fpr_limit=0.3) == pytest.approx(0.15, abs=1e-12)


def test_au_pro_perfect_and_inverted() -> None:
    masks, _ = hand_case()
    assert au_pro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert au_pro(masks, 1.0 - masks.astype(np.float32)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="anomalous pixel"):
        au_pro(np.zeros((1, 4, 4), dtype=bool), np.zeros((1, 4, 4)))


def direct_au_pro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Slow reference: threshold at every distinct value, measure each region's overlap directly."""
    per_image_regions = []
    for index, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        per_image_regions += [(index, labels == k) for k in range(1, count + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        above = maps >= threshold
        fpr = above[normal].mean()
        pro = np.mean([above[index][region].mean() for index, region in per_image_regions])
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def test_au_pro_matches_direct_computation_on_random_maps() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((5, 24, 24), dtype=bool)
    masks[0, 2:6, 2:9] = True
    masks[0, 15:20, 15:17] = True
    masks[2, 10:22, 3:5] = True
    masks[2, 9, 5] = True  # diagonal neighbour: same region with 8-connectivity
    masks[4, 0:3, 20:24] = True
    maps = np.round(rng.random(masks.shape) + masks * 0.3, 2)  # ties across normal and defect pixels
    for limit in (0.05, 0.3, 1.0):
        assert au_pro(masks, maps, fpr_limit=limit) == pytest.approx(
            direct_au_pro(masks, maps, limit), abs=1e-9
        )
