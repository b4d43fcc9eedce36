"""HTTP load generator: run as its own process (`python -m benchmarks.http_load ...`) so the client's CPU
time never shares an interpreter (or a GIL) with the server.

Two modes:
- closed loop: `concurrency` workers, each sends the next request as soon as its last one is answered
  (throughput at a given number of requests in flight). Answers that arrive inside the measured window
  count (so a saturated server whose answers take longer than the window still shows its throughput);
- open loop: requests arrive at a fixed rate, like a camera at N frames/s (fixed intervals, or Poisson
  arrivals), whether or not earlier ones were answered; every request SCHEDULED inside the window counts,
  with its latency measured from the scheduled send time, so a client or server that falls behind shows
  it (no coordinated omission).

At the start and the end of the window the client reads `/metrics` and reports the mean batch size the
server formed in between (`ead_batch_size_sum` / `_count` deltas). Prints one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.timing import percentile

BATCH_SIZE_METRIC = "ead_batch_size"


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


@dataclass
class LoadResult:
    mode: str  # "closed" | "open"
    concurrency: int | None  # closed loop: requests in flight
    rate: float | None  # open loop: offered requests/s
    arrivals: str | None  # open loop: "fixed" | "poisson"
    duration_s: float  # measured window (open loop: until the last request scheduled in it was answered)
    requests: int  # requests counted (closed: answered in the window; open: scheduled in the window)
    ok: int  # answered 200 with a score
    errors: dict[str, int] = field(default_factory=dict)  # HTTP status or exception name -> count
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    max_ms: float | None = None
    throughput_rps: float = 0.0  # answered (200) requests per second of the window
    mean_batch_size: float | None = None  # from /metrics deltas over the window
    batches: int | None = None
    max_send_lag_ms: float | None = None  # open loop: worst delay of an actual send behind its schedule
    server_p50_ms: dict[str, float] = field(default_factory=dict)  # p50 of the answers' own timings_ms

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SERVER_STAGES = ("decode", "queue", "inference", "encode", "total")


@dataclass(frozen=True)
class _Answer:
    error: str | None  # None on success, else "503", "ReadTimeout", "bad_response", ...
    server_ms: dict[str, float] | None = None  # the answer's own timings_ms (decode, queue, ...)


class _Recorder:
    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.server_ms: dict[str, list[float]] = {stage: [] for stage in SERVER_STAGES}
        self.errors: Counter[str] = Counter()
        self.sent = 0
        self.last_end = -math.inf
        self.max_lag_ms = 0.0

    def add(self, start: float, end: float, answer: _Answer) -> None:
        self.sent += 1
        self.last_end = max(self.last_end, end)
        if answer.error is not None:
            self.errors[answer.error] += 1
            return
        self.latencies_ms.append((end - start) * 1000.0)
        for stage, values in self.server_ms.items():
            if answer.server_ms and stage in answer.server_ms:
                values.append(float(answer.server_ms[stage]))


async def _post(client: Any, url: str, body: bytes, headers: dict[str, str]) -> _Answer:
    import httpx

    try:
        response = await client.post(url, content=body, headers=headers)
    except httpx.HTTPError as error:
        return _Answer(type(error).__name__)
    if response.status_code != 200:
        return _Answer(str(response.status_code))
    try:
        document = response.json()
    except ValueError:
        return _Answer("bad_response")
    if not isinstance(document, dict) or "score" not in document:
        return _Answer("bad_response")
    timings = document.get("timings_ms")
    return _Answer(None, timings if isinstance(timings, dict) else None)


async def _scrape_batches(client: Any, base_url: str) -> tuple[float, float] | None:
    import httpx

    try:
        response = await client.get(f"{base_url}/metrics")
    except httpx.HTTPError:
        return None
    return batch_totals(response.text) if response.status_code == 200 else None


@dataclass
class _Window:
    """The measured window in perf_counter seconds; open (end = inf) until it is closed."""

    start: float = math.inf
    end: float = math.inf

    def holds(self, moment: float) -> bool:
        return self.start <= moment <= self.end


Scrape = Callable[[], Awaitable[tuple[float, float] | None]]


async def _wait_until(event: asyncio.Event, deadline: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=max(0.0, deadline - time.perf_counter()))


async def closed_loop(
    client: Any,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    max_s: float,
    scrape: Scrape,
) -> tuple[_Recorder, _Window, tuple[float, float] | None, tuple[float, float] | None]:
    """`concurrency` workers back to back; answers that arrive inside the window are recorded.

    Steady state first: the window opens after `warmup_s` AND once every worker has had one answer (on a
    slow machine a full round of 128 requests takes many batches). It stays open `duration_s` and until
    `concurrency` answers are in, so every slot turned over at least once; warm-up plus window are capped
    at `max_s`. Requests still in flight at the end are waited for (not recorded), so the next run starts
    on an idle server. Returns (recorder, window, /metrics batch totals at window start and end).
    """
    recorder, window = _Recorder(), _Window()
    origin = time.perf_counter()
    first_answers = 0
    all_answered_once, stop = asyncio.Event(), asyncio.Event()

    async def worker() -> None:
        nonlocal first_answers
        first = True
        while not stop.is_set():
            start = time.perf_counter()
            answer = await _post(client, url, body, headers)
            end = time.perf_counter()
            if window.holds(end):
                recorder.add(start, end, answer)
            if first:
                first, first_answers = False, first_answers + 1
                if first_answers == concurrency:
                    all_answered_once.set()

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup_s)
    await _wait_until(all_answered_once, origin + max_s / 2)
    before = await scrape()
    window.start = time.perf_counter()
    await asyncio.sleep(duration_s)
    while recorder.sent < concurrency and time.perf_counter() < origin + max_s:
        await asyncio.sleep(0.05)
    window.end = time.perf_counter()
    after = await scrape()
    stop.set()
    await asyncio.gather(*workers)
    return recorder, window, before, after


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


async def open_loop(
    client: Any,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    offsets: list[float],
    origin: float,
    window_start: float,
) -> _Recorder:
    """Requests at `origin + offsets` regardless of answers; those scheduled from `window_start` on are
    recorded, each latency counted from its schedule."""
    recorder = _Recorder()
    tasks = []

    async def send(scheduled: float) -> None:
        lag_ms = (time.perf_counter() - scheduled) * 1000.0
        answer = await _post(client, url, body, headers)
        if scheduled >= window_start:
            recorder.max_lag_ms = max(recorder.max_lag_ms, lag_ms)
            recorder.add(scheduled, time.perf_counter(), answer)

    for offset in offsets:
        scheduled = origin + offset
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(scheduled)))
    await asyncio.gather(*tasks)
    return recorder


def _summarise(
    recorder: _Recorder,
    *,
    mode: str,
    concurrency: int | None,
    rate: float | None,
    arrivals: str | None,
    window: _Window,
) -> LoadResult:
    latencies = recorder.latencies_ms
    elapsed = window.end - window.start
    if mode == "open":  # until the last request scheduled in the window was answered
        elapsed = max(elapsed, recorder.last_end - window.start)
    result = LoadResult(
        mode=mode,
        concurrency=concurrency,
        rate=rate,
        arrivals=arrivals,
        duration_s=round(elapsed, 3),
        requests=recorder.sent,
        ok=len(latencies),
        errors=dict(recorder.errors),
        throughput_rps=len(latencies) / elapsed,
        max_send_lag_ms=recorder.max_lag_ms if mode == "open" else None,
    )
    if latencies:
        result.p50_ms = percentile(latencies, 50)
        result.p95_ms = percentile(latencies, 95)
        result.p99_ms = percentile(latencies, 99)
        result.mean_ms = sum(latencies) / len(latencies)
        result.max_ms = max(latencies)
    result.server_p50_ms = {
        stage: percentile(values, 50) for stage, values in recorder.server_ms.items() if values
    }
    return result


async def run_load(args: argparse.Namespace) -> LoadResult:
    import httpx

    base_url = args.url.rstrip("/")
    url = f"{base_url}/predict" + (f"?{args.query}" if args.query else "")
    body = Path(args.image).read_bytes()
    headers = {"Content-Type": args.content_type}
    if args.api_key:
        headers["X-API-Key"] = args.api_key
    connections = args.concurrency if args.mode == "closed" else args.max_connections
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(args.timeout)
    # trust_env=False: a proxy from the environment must never sit between the client and a loopback server.
    # /metrics is read through its own connection: the load's pool may be busy (at concurrency 1, always).
    async with (
        httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client,
        httpx.AsyncClient(timeout=timeout, trust_env=False) as metrics_client,
    ):

        async def scrape() -> tuple[float, float] | None:
            return await _scrape_batches(metrics_client, base_url)

        if args.mode == "closed":
            recorder, window, before, after = await closed_loop(
                client,
                url,
                body,
                headers,
                concurrency=args.concurrency,
                warmup_s=args.warmup,
                duration_s=args.duration,
                max_s=max(args.max_seconds, args.warmup + args.duration),
                scrape=scrape,
            )
        else:
            origin = time.perf_counter()
            window = _Window(origin + args.warmup, origin + args.warmup + args.duration)

            async def scrape_at(moment: float) -> tuple[float, float] | None:
                await asyncio.sleep(max(0.0, moment - time.perf_counter()))
                return await scrape()

            scrapes = asyncio.gather(scrape_at(window.start), scrape_at(window.end))
            offsets = arrival_offsets(args.rate, args.warmup + args.duration, args.arrivals, args.seed)
            recorder = await open_loop(
                client, url, body, headers, offsets=offsets, origin=origin, window_start=window.start
            )
            before, after = await scrapes
    result = _summarise(
        recorder,
        mode=args.mode,
        concurrency=args.concurrency if args.mode == "closed" else None,
        rate=args.rate if args.mode == "open" else None,
        arrivals=args.arrivals if args.mode == "open" else None,
        window=window,
    )
    if before is not None and after is not None and after[1] > before[1]:
        result.batches = int(after[1] - before[1])
        result.mean_batch_size = (after[0] - before[0]) / (after[1] - before[1])
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.http_load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--image", required=True, type=Path, help="image file sent as the request body")
    parser.add_argument("--content-type", default="image/jpeg")
    parser.add_argument("--query", default="", help="query string for /predict, e.g. heatmap=none")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--mode", choices=["closed", "open"], default="closed")
    parser.add_argument("--concurrency", type=int, default=1, help="closed loop: requests in flight")
    parser.add_argument("--rate", type=float, default=10.0, help="open loop: requests per second")
    parser.add_argument("--arrivals", choices=["fixed", "poisson"], default="fixed")
    parser.add_argument("--max-connections", type=int, default=512, help="open loop: connection pool size")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the window opens")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="closed loop: cap on warm-up + window (see closed_loop)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ModuleNotFoundError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(run_load(args))
    print(json.dumps(result.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
