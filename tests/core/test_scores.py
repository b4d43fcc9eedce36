"""The core's score math (efficientad/scores.py): AUROC, thresholds, false-alarm, miss and detection rates.

scikit-learn is the oracle for the AUROC; the threshold rule is checked against its definition by brute force.
"""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from efficientad.scores import (
    default_threshold,
    detection_rate,
    image_auroc,
    images_needed,
    labelled,
    miss_rate,
    rate_is_resolvable,
    threshold_for_false_alarm_rate,
)
from efficientad.scores import false_alarm_rate as false_alarm_rate_of


def auroc_of(good: list[float] | np.ndarray, defects: list[float] | np.ndarray) -> float:
    return image_auroc(*labelled(good, defects))


# --- the threshold rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(0.1, 9.0), (0.2, 8.0), (0.5, 5.0), (0.3, 7.0), (0.99, 1.0), (0.01, 10.0), (0.0, 10.0), (0.15, 9.0)],
)
def test_threshold_is_the_k_th_smallest_good_score(rate: float, expected: float) -> None:
    scores = [7.0, 3.0, 10.0, 1.0, 5.0, 9.0, 2.0, 8.0, 4.0, 6.0]  # 1..10 shuffled: s_k = k
    assert threshold_for_false_alarm_rate(scores, rate) == expected  # k = max(1, ceil(10 (1 - rate)))


def test_threshold_needs_no_float_luck() -> None:
    # 10 * (1 - 0.7) is 3.0000000000000004 in floats: a naive ceil would pick s_4 (20 % above, not 30 %)
    assert threshold_for_false_alarm_rate(np.arange(1, 11), 0.7) == 3.0
    assert threshold_for_false_alarm_rate(np.arange(1, 21), 0.95) == 1.0  # 20 * 0.05 = 1: k = 1, not 2
    scores = np.arange(1, 101, dtype=np.float64)
    assert threshold_for_false_alarm_rate(scores, 0.01) == 99.0  # 1 of 100 above it
    assert threshold_for_false_alarm_rate(np.arange(1, 1001), 0.001) == 999.0


def test_threshold_with_ties_and_a_single_image() -> None:
    assert threshold_for_false_alarm_rate([1.0, 2.0, 2.0, 2.0], 0.5) == 2.0
    assert threshold_for_false_alarm_rate([0.25], 0.01) == 0.25
    assert threshold_for_false_alarm_rate([0.25], 0.99) == 0.25  # k is at least 1


def test_threshold_is_the_smallest_score_meeting_the_rate() -> None:
    """The defining property, checked by brute force on scores with many ties."""
    generator = np.random.default_rng(0)
    for count, rate in product((1, 3, 10, 37, 200), (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.9)):
        scores = generator.integers(0, 12, size=count).astype(np.float64)
        threshold = threshold_for_false_alarm_rate(scores, rate)
        meeting = [t for t in np.unique(scores) if np.mean(scores > t) <= rate]
        assert threshold == min(meeting), (count, rate)
        assert false_alarm_rate_of(scores, threshold) <= rate


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_threshold_refuses_rates_outside_0_to_1(rate: float) -> None:
    with pytest.raises(ValueError, match="false-alarm rate"):
        threshold_for_false_alarm_rate([1.0, 2.0], rate)


def test_threshold_needs_scores() -> None:
    with pytest.raises(ValueError, match="at least one good image"):
        threshold_for_false_alarm_rate([], 0.01)


def test_resolvable_means_at_least_one_over_rate_images() -> None:
    assert rate_is_resolvable(100, 0.01) and not rate_is_resolvable(99, 0.01)
    assert rate_is_resolvable(10, 0.1) and not rate_is_resolvable(9, 0.1)
    assert rate_is_resolvable(34, 0.03) and not rate_is_resolvable(33, 0.03)
    assert not rate_is_resolvable(10**6, 0.0)
    assert images_needed(0.01) == 100 and images_needed(0.03) == 34 and images_needed(0.0) is None


def test_false_alarm_and_miss_rates_follow_the_servers_score_above_threshold() -> None:
    assert false_alarm_rate_of([0.1, 0.2, 0.3, 0.4], 0.3) == 0.25  # only 0.4 > 0.3
    assert miss_rate([0.3, 0.5, 0.6, 0.2], 0.3) == 0.5  # 0.3 and 0.2 <= 0.3


# --- the AUROC ------------------------------------------------------------------------------------------


def test_auroc_by_hand_with_a_tie() -> None:
    # pairs (defect, good): 0.3 beats 0.1 and 0.2 and ties 0.3 (2.5); 0.4 beats all three (3) -> 5.5 / 6
    assert auroc_of([0.1, 0.2, 0.3], [0.3, 0.4]) == pytest.approx(5.5 / 6)


def test_auroc_extremes_and_all_ties() -> None:
    assert auroc_of([0.1, 0.2], [0.3, 0.4, 0.5]) == 1.0
    assert auroc_of([0.3, 0.4, 0.5], [0.1, 0.2]) == 0.0
    assert auroc_of([0.7, 0.7], [0.7, 0.7, 0.7]) == 0.5
    assert auroc_of([1.0, 3.0], [2.0]) == 0.5


def test_auroc_matches_pairwise_counting() -> None:
    generator = np.random.default_rng(1)
    for _ in range(20):
        good = generator.integers(0, 6, size=generator.integers(1, 30)).astype(float)
        defects = generator.integers(2, 9, size=generator.integers(1, 30)).astype(float)
        wins = (defects[:, None] > good[None, :]).sum() + 0.5 * (defects[:, None] == good[None, :]).sum()
        assert auroc_of(good, defects) == pytest.approx(wins / (good.size * defects.size))


def test_auroc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both normal and anomalous"):
        auroc_of([0.1], [])


def test_auroc_matches_scikit_learn_with_ties() -> None:
    generator = np.random.default_rng(2)
    for _ in range(20):
        labels = generator.random(50) < 0.4
        labels[:2] = [True, False]
        scores = generator.integers(0, 10, size=50).astype(np.float32)
        assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_detection_rate_is_one_minus_the_miss_rate() -> None:
    defects = [0.1, 0.3, 0.3, 0.9]
    assert detection_rate(defects, 0.3) == 0.25 and miss_rate(defects, 0.3) == 0.75


def test_default_threshold_is_the_09_quantile_of_the_good_scores_plus_one_map_unit() -> None:
    scores = np.array([0.0426, 0.0616, 0.0967])  # the first shipped cookie model's three validation photos
    assert default_threshold(scores) == pytest.approx(np.quantile(scores, 0.9) + 0.1, rel=1e-12)
    assert default_threshold(scores) > scores.max()  # three photos: the max would be one draw of the tail
    assert default_threshold([0.3]) == pytest.approx(0.4)
    generator = np.random.default_rng(0)
    many = np.exp(generator.normal(-2.5, 0.3, size=200_000))  # log-normal good scores
    quantile = np.quantile(many, 0.9)
    assert false_alarm_rate_of(many, default_threshold(many)) < false_alarm_rate_of(many, quantile) == 0.1


def test_default_threshold_holds_when_one_held_out_score_is_near_zero() -> None:
    """The log-normal fit it replaced jumped to several times the largest score here."""
    scores = np.array([0.21, 0.25, 0.27, 0.3, 1e-4])
    assert scores.max() < default_threshold(scores) < scores.max() + 0.1
    assert default_threshold(np.append(scores, 1e-7)) == pytest.approx(default_threshold(scores), abs=0.03)


def test_default_threshold_refuses_no_scores_and_non_finite_ones() -> None:
    with pytest.raises(ValueError, match="at least one held-out"):
        default_threshold([])
    with pytest.raises(ValueError, match="NaN or infinite"):
        default_threshold([0.1, float("nan")])
