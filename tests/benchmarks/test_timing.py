"""Percentiles and the timing loop: the arithmetic behind every figure in the report."""

from __future__ import annotations

import time

import numpy as np
import pytest

from benchmarks.timing import (
    LatencySummary,
    WallClockTimer,
    measure,
    measure_within,
    median_of_runs,
    percentile,
)


def test_percentile_on_known_data() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1
    assert percentile(values, 100) == 100
    assert percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)  # unsorted input
    assert percentile([7.0], 99) == 7.0


def test_percentile_matches_numpy_linear_method() -> None:
    values = np.random.default_rng(0).exponential(10.0, size=257).tolist()
    for q in (1, 25, 50, 90, 95, 99, 99.9):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_rejects_bad_input(q: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0, 2.0], q)
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_summary_throughput_is_batch_over_mean_latency() -> None:
    summary = LatencySummary.from_latencies([10.0, 10.0, 20.0, 40.0], batch_size=8)  # mean 20 ms
    assert summary.mean_ms == pytest.approx(20.0)
    assert summary.images_per_s == pytest.approx(8 / 0.020)
    assert summary.p50_ms == pytest.approx(15.0)
    assert summary.calls == 4


def test_median_of_runs_takes_each_statistic_median() -> None:
    runs = [LatencySummary.from_latencies([value] * 3, batch_size=2) for value in (10.0, 30.0, 11.0)]
    combined = median_of_runs(runs)
    assert combined.p50_ms == pytest.approx(11.0)  # the disturbed run (30 ms) does not move the median
    assert combined.images_per_s == pytest.approx(2 / 0.011)
    assert combined.calls == 9


def test_measure_runs_warmup_then_repeats_of_iterations() -> None:
    calls = []
    median, runs = measure(
        lambda: calls.append(1), batch_size=1, timer=WallClockTimer(), warmup=2, iterations=5, repeats=3
    )
    assert len(runs) == 3 and all(run.calls == 5 for run in runs)
    assert len(calls) == 2 + 1 + 15  # warm-up, one settling call, the timed calls
    assert median.p50_ms >= 0.0
    with pytest.raises(ValueError, match="iterations"):
        measure(lambda: None, batch_size=1, timer=WallClockTimer(), warmup=0, iterations=0, repeats=1)


def test_measure_within_cuts_slow_cases_down_to_the_budget() -> None:
    calls = []

    def slow() -> None:
        calls.append(1)
        time.sleep(0.05)

    _, runs = measure_within(
        slow, batch_size=1, timer=WallClockTimer(), warmup=10, iterations=100, repeats=2, budget_s=0.3
    )
    assert [run.calls for run in runs] == [2, 2]  # at least 2 per run, no more than the budget allows
    assert len(calls) <= 8  # not 10 warm-up + 200 timed calls


def test_measure_within_keeps_the_asked_iterations_for_fast_calls() -> None:
    _, runs = measure_within(
        lambda: None, batch_size=1, timer=WallClockTimer(), warmup=3, iterations=7, repeats=3, budget_s=1.0
    )
    assert [run.calls for run in runs] == [7, 7, 7]


def test_measure_stops_at_the_deadline_with_at_least_one_run_of_two_calls() -> None:
    deadline = time.perf_counter() - 1.0  # already past
    _, runs = measure(
        lambda: None,
        batch_size=1,
        timer=WallClockTimer(),
        warmup=0,
        iterations=50,
        repeats=5,
        deadline=deadline,
    )
    assert [run.calls for run in runs] == [2]
