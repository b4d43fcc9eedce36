"""The one load driver of the benchmarks: a closed loop, an open loop, the answer check and the /metrics
scrape, over benchmarks.raw_http's keep-alive client (requests prepared as bytes, a few tens of
microseconds of client per request). `make bench` (server overhead, HTTP) and `make soak` use it.

- closed loop: `concurrency` connections, each sends its next request as soon as its last one is
  answered (throughput at a given number of requests in flight). The window opens after the warm-up and
  once every connection has had an answer, stays open `duration_s` and until `concurrency` answers are
  counted (so a request slower than the window is still measured), within `max_s` in all;
- open loop: requests sent on a schedule (like a camera at N frames/s) whether or not earlier ones were
  answered, each latency counted from its SCHEDULED send time (no coordinated omission); at most
  `max_connections` connections, a request finding all busy waits for one (its wait counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from benchmarks.raw_http import ConnectionPool, ProtocolError, Reply, build_request
from benchmarks.timing import percentile

BATCH_SIZE_METRIC = "ead_batch_size"
Check = Callable[[Reply], str | None]  # None: a good answer; else what was wrong with it
Scrape = Callable[[], Awaitable[tuple[float, float] | None]]
TRANSPORT_ERRORS = (OSError, TimeoutError, ProtocolError, asyncio.IncompleteReadError, ValueError)


# ------------------------------------------------------------------------------------ answers


def status_ok(reply: Reply) -> str | None:
    """Any 200 is a good answer (e.g. /health/live)."""
    return None if reply.status == 200 else str(reply.status)


def prediction_check(*, want_heatmap: bool) -> Check:
    """A good /predict answer: 200, a JSON object with a finite score (and a heatmap when asked)."""

    def check(reply: Reply) -> str | None:
        if reply.status != 200:
            return str(reply.status)
        try:
            document = orjson.loads(reply.body)
            score = float(document["score"])
        except (ValueError, KeyError, TypeError):
            return "bad_response"
        if not math.isfinite(score) or (want_heatmap and not document.get("heatmap_png")):
            return "bad_response"
        return None

    return check


# ----------------------------------------------------------------------------------- /metrics


def parse_metric_total(text: str, name: str) -> float:
    """The sum over all label sets of one Prometheus sample name (e.g. `ead_batch_size_sum`)."""
    total = 0.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        sample, _, rest = line.partition(" ")
        if sample.split("{", 1)[0] != name:
            continue
        total += float(rest.split()[0])
    return total


def batch_totals(metrics_text: str) -> tuple[float, float]:
    """(sum of batch sizes, number of batches) from the server's /metrics text."""
    return (
        parse_metric_total(metrics_text, f"{BATCH_SIZE_METRIC}_sum"),
        parse_metric_total(metrics_text, f"{BATCH_SIZE_METRIC}_count"),
    )


def metrics_scrape(host: str, port: int) -> Scrape:
    """Reads the batch totals from /metrics over a connection of its own (the load's may all be busy)."""
    pool = ConnectionPool(host, port, timeout_s=10.0)
    request = build_request("GET", "/metrics", host=f"{host}:{port}")

    async def scrape() -> tuple[float, float] | None:
        try:
            reply = await pool.exchange(request)
        except TRANSPORT_ERRORS:
            return None
        return batch_totals(reply.body.decode()) if reply.status == 200 else None

    return scrape


# ------------------------------------------------------------------------------------ records


@dataclass
class Recording:
    """What one loop measured inside its window."""

    latencies_ms: list[float] = field(default_factory=list)  # good answers only
    stages_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # Server-Timing
    errors: Counter[str] = field(default_factory=Counter)
    window_s: float = 0.0
    max_send_lag_ms: float | None = None  # open loop: worst delay of a send behind its schedule
    batches: tuple[float, float] | None = None  # (sum of batch sizes, batches) formed in the window

    @property
    def answers(self) -> int:
        return len(self.latencies_ms) + sum(self.errors.values())

    def add(self, latency_ms: float, error: str | None, stages: dict[str, float] | None = None) -> None:
        if error is not None:
            self.errors[error] += 1
            return
        self.latencies_ms.append(latency_ms)
        for stage, value in (stages or {}).items():
            self.stages_ms[stage].append(value)

    def summary(self) -> dict[str, Any]:
        """p50/p95/p99/mean/max ms of the good answers, their rate, the errors, the mean batch."""
        latencies = self.latencies_ms
        stats: dict[str, Any] = {
            f"{name}_ms": (round(percentile(latencies, q), 3) if latencies else None)
            for name, q in (("p50", 50), ("p95", 95), ("p99", 99))
        }
        stats["mean_ms"] = round(sum(latencies) / len(latencies), 3) if latencies else None
        stats["max_ms"] = round(max(latencies), 3) if latencies else None
        stats["requests"] = self.answers
        stats["ok"] = len(latencies)
        stats["errors"] = dict(self.errors)
        stats["throughput_rps"] = round(len(latencies) / self.window_s, 1) if self.window_s > 0 else 0.0
        stats["duration_s"] = round(self.window_s, 3)
        stats["stages_p50_ms"] = {
            stage: round(percentile(values, 50), 3) for stage, values in self.stages_ms.items() if values
        }
        stats["max_send_lag_ms"] = None if self.max_send_lag_ms is None else round(self.max_send_lag_ms, 3)
        stats["mean_batch_size"], stats["batches"] = None, None
        if self.batches is not None and self.batches[1] > 0:
            stats["mean_batch_size"] = round(self.batches[0] / self.batches[1], 3)
            stats["batches"] = int(self.batches[1])
        return stats


async def _send(
    pool: ConnectionPool, request: bytes, check: Check
) -> tuple[str | None, dict[str, float] | None]:
    """-> (None for a good answer, else what went wrong; the answer's Server-Timing stages)."""
    try:
        reply = await pool.exchange(request)
    except TRANSPORT_ERRORS as failure:
        return type(failure).__name__, None
    error = check(reply)
    return error, None if error is not None else reply.server_timing()


def _batch_delta(
    before: tuple[float, float] | None, after: tuple[float, float] | None
) -> tuple[float, float] | None:
    if before is None or after is None:
        return None
    return (after[0] - before[0], after[1] - before[1])


# -------------------------------------------------------------------------------- closed loop


async def closed_loop(
    pool: ConnectionPool,
    requests: Sequence[bytes],
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    max_s: float | None = None,
    check: Check = status_ok,
    scrape: Scrape | None = None,
) -> Recording:
    """`concurrency` connections back to back, each going through `requests` in turn (from its own
    offset); see the module's description for the window. `max_s` (default warm-up + 4x the window)
    caps warm-up plus window, once an answer is counted. Requests in flight at the end are awaited, not
    counted."""
    max_s = max_s if max_s is not None else warmup_s + 4 * duration_s
    await pool.prepare(concurrency)
    recording = Recording()
    origin = time.perf_counter()
    window_start = math.inf
    closed_at: float | None = None
    answered_once, all_answered = 0, asyncio.Event()

    async def worker(offset: int) -> None:
        nonlocal answered_once
        sent = offset
        first = True
        while closed_at is None:
            started = time.perf_counter()
            error, stages = await _send(pool, requests[sent % len(requests)], check)
            ended = time.perf_counter()
            sent += concurrency
            if first:
                first, answered_once = False, answered_once + 1
                if answered_once == concurrency:
                    all_answered.set()
            if window_start <= started and (closed_at is None or ended <= closed_at):
                recording.add((ended - started) * 1000.0, error, stages)

    workers = [asyncio.create_task(worker(index)) for index in range(concurrency)]
    await asyncio.sleep(warmup_s)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_answered.wait(), max(0.0, origin + max_s / 2 - time.perf_counter()))
    before = await scrape() if scrape else None
    window_start = time.perf_counter()
    await asyncio.sleep(duration_s)
    # past max_s the window still waits for its first answer: a request slower than the window counts
    while recording.answers < concurrency and (time.perf_counter() < origin + max_s or not recording.answers):
        await asyncio.sleep(0.001)
    closed_at = time.perf_counter()
    recording.window_s = closed_at - window_start
    after = await scrape() if scrape else None
    await asyncio.gather(*workers)
    pool.close()
    recording.batches = _batch_delta(before, after)
    return recording


# ---------------------------------------------------------------------------------- open loop


def arrival_offsets(rate: float, duration_s: float, arrivals: str, seed: int = 0) -> list[float]:
    """Send times (s from the start) for an open loop at `rate` requests/s over `duration_s`."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if arrivals == "fixed":
        return [k / rate for k in range(int(duration_s * rate))]
    if arrivals == "poisson":
        generator, offsets, now = random.Random(seed), [], 0.0
        while (now := now + generator.expovariate(rate)) < duration_s:
            offsets.append(now)
        return offsets
    raise ValueError(f"arrivals must be 'fixed' or 'poisson', got {arrivals!r}")


@dataclass(frozen=True)
class Outcome:
    scheduled_s: float  # send time, from the start of the loop
    latency_ms: float  # answer time - scheduled send time
    error: str | None  # None: a good answer; else the status code or exception name
    stages: dict[str, float] | None = field(default=None, repr=False, compare=False)  # Server-Timing


async def open_loop(
    pool: ConnectionPool,
    requests: Sequence[bytes],
    *,
    offsets: Sequence[float],
    check: Check = status_ok,
    keep_stages: bool = False,
) -> tuple[list[Outcome], float]:
    """`requests[i % len]` at `offsets[i]` s from now, whether or not earlier ones were answered (with
    `keep_stages`, each outcome keeps its answer's Server-Timing: off for long soaks).

    -> (one outcome per request in schedule order, the worst lag of a send behind its schedule in ms).
    """
    outcomes: list[Outcome] = []
    max_lag_s = 0.0
    origin = time.perf_counter()

    async def send(index: int, offset: float) -> None:
        nonlocal max_lag_s
        max_lag_s = max(max_lag_s, time.perf_counter() - origin - offset)
        error, stages = await _send(pool, requests[index % len(requests)], check)
        latency_ms = (time.perf_counter() - origin - offset) * 1000
        outcomes.append(Outcome(offset, latency_ms, error, stages if keep_stages else None))

    tasks = set()
    for index, offset in enumerate(offsets):
        delay = origin + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(send(index, offset))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    pool.close()
    outcomes.sort(key=lambda outcome: outcome.scheduled_s)
    return outcomes, max_lag_s * 1000


def record_window(outcomes: Sequence[Outcome], start_s: float, end_s: float, max_lag_ms: float) -> Recording:
    """The open loop's requests SCHEDULED in [start_s, end_s) as a Recording; its window lasts until the
    last of them was answered."""
    recording = Recording(max_send_lag_ms=max_lag_ms)
    last_answer = end_s
    for outcome in outcomes:
        if start_s <= outcome.scheduled_s < end_s:
            recording.add(outcome.latency_ms, outcome.error, outcome.stages)
            last_answer = max(last_answer, outcome.scheduled_s + outcome.latency_ms / 1000)
    recording.window_s = last_answer - start_s
    return recording
