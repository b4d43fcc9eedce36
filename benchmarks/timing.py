"""Percentiles and timers: the arithmetic every benchmark figure goes through.

Percentiles use linear interpolation between closest ranks (numpy's default "linear" method), so the
p50 of [1, 2, 3, 4] is 2.5 and the p90 of 1..100 is 90.1.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) of `values`, linearly interpolated between closest ranks."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    fraction = position - lower
    return ordered[lower] + (ordered[upper] - ordered[lower]) * fraction


@dataclass(frozen=True)
class LatencySummary:
    """Per-call latencies of one timed run of `batch_size` images per call, in milliseconds."""

    batch_size: int
    calls: int
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float  # batch_size * calls / total time of the calls

    @classmethod
    def from_latencies(cls, latencies_ms: Sequence[float], batch_size: int) -> LatencySummary:
        total_s = sum(latencies_ms) / 1000.0
        return cls(
            batch_size=batch_size,
            calls=len(latencies_ms),
            p50_ms=percentile(latencies_ms, 50),
            p90_ms=percentile(latencies_ms, 90),
            p95_ms=percentile(latencies_ms, 95),
            p99_ms=percentile(latencies_ms, 99),
            mean_ms=statistics.fmean(latencies_ms),
            images_per_s=batch_size * len(latencies_ms) / total_s if total_s > 0 else math.inf,
        )


def median_of_runs(runs: Sequence[LatencySummary]) -> LatencySummary:
    """Each statistic's median over repeated runs (robust to one run disturbed by another process)."""
    if not runs:
        raise ValueError("no runs to summarise")
    return LatencySummary(
        batch_size=runs[0].batch_size,
        calls=sum(run.calls for run in runs),
        p50_ms=statistics.median(run.p50_ms for run in runs),
        p90_ms=statistics.median(run.p90_ms for run in runs),
        p95_ms=statistics.median(run.p95_ms for run in runs),
        p99_ms=statistics.median(run.p99_ms for run in runs),
        mean_ms=statistics.median(run.mean_ms for run in runs),
        images_per_s=statistics.median(run.images_per_s for run in runs),
    )


MIN_CALLS_PER_RUN = 2


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() > deadline


class WallClockTimer:
    """Times synchronous calls with `time.perf_counter` (CPU work, or GPU calls that block until done)."""

    name = "perf_counter"

    def time_calls(self, call: Callable[[], Any], count: int, deadline: float | None = None) -> list[float]:
        """`count` latencies in ms (fewer, but at least 2, once the perf_counter time `deadline` passed)."""
        latencies_ms: list[float] = []
        for _ in range(count):
            if _past(deadline) and len(latencies_ms) >= MIN_CALLS_PER_RUN:
                break
            start = time.perf_counter()
            call()
            latencies_ms.append((time.perf_counter() - start) * 1000.0)
        return latencies_ms


class CudaEventTimer:
    """Times calls on the GPU with CUDA events, synchronising after each call (latency, not pipelining).

    The start event is recorded before the call is launched, so host-side launch gaps that leave the GPU
    idle are inside the figure, as a caller waiting for the result would see them.
    """

    name = "cuda_events"

    def __init__(self, device: Any):
        import torch

        self._torch = torch
        self._device = device

    def time_calls(self, call: Callable[[], Any], count: int, deadline: float | None = None) -> list[float]:
        torch = self._torch
        latencies_ms: list[float] = []
        with torch.cuda.device(self._device):
            stream = torch.cuda.current_stream()
            for _ in range(count):
                if _past(deadline) and len(latencies_ms) >= MIN_CALLS_PER_RUN:
                    break
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                call()
                end.record(stream)
                end.synchronize()
                latencies_ms.append(start.elapsed_time(end))
        return latencies_ms


def measure(
    call: Callable[[], Any],
    *,
    batch_size: int,
    timer: WallClockTimer | CudaEventTimer,
    warmup: int,
    iterations: int,
    repeats: int,
    deadline: float | None = None,
) -> tuple[LatencySummary, list[LatencySummary]]:
    """Warm up, then `repeats` runs of `iterations` timed calls: (median over runs, each run's summary).

    Past `deadline` (a perf_counter time) the current run stops after 2 calls and no further run starts.
    """
    if iterations < 1 or repeats < 1:
        raise ValueError(f"iterations and repeats must be >= 1, got {iterations} and {repeats}")
    for _ in range(warmup):
        call()
    if warmup:
        timer.time_calls(call, 1)  # make sure queued warm-up work has finished before timing starts
    runs: list[LatencySummary] = []
    while len(runs) < repeats and not (runs and _past(deadline)):
        runs.append(LatencySummary.from_latencies(timer.time_calls(call, iterations, deadline), batch_size))
    return median_of_runs(runs), runs


def measure_within(
    call: Callable[[], Any],
    *,
    batch_size: int,
    timer: WallClockTimer | CudaEventTimer,
    warmup: int,
    iterations: int,
    repeats: int,
    budget_s: float,
) -> tuple[LatencySummary, list[LatencySummary]]:
    """`measure`, with warm-up and iterations cut down so that slow calls stay near `budget_s` in all.

    One untimed call first (allocations, lazy init), then one timed probe call sets the pace: the rest of
    the warm-up gets at most a fifth of the budget, and each of the `repeats` runs gets at least 2 calls.
    If calls then slow down (another process took the CPU), timing stops at twice the budget.
    """
    deadline = time.perf_counter() + 2.0 * budget_s
    call()
    probe_s = max(timer.time_calls(call, 1)[0] / 1000.0, 1e-6)
    warmup_left = min(max(warmup - 2, 0), int(0.2 * budget_s / probe_s))
    affordable = int(0.8 * budget_s / probe_s / repeats)
    return measure(
        call,
        batch_size=batch_size,
        timer=timer,
        warmup=warmup_left,
        iterations=max(MIN_CALLS_PER_RUN, min(iterations, affordable)),
        repeats=repeats,
        deadline=deadline,
    )
