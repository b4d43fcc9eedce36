"""Soak test: the real server under a steady open-loop load for a long time.

    python -m benchmarks.soak --null-model --duration 600 --fraction 0.8      (or: make soak)

1. Starts `efficientad serve` (ONNX Runtime on the CPU by default) on a free loopback port with the
   given model dir, a null model (`--null-model`: the real contract, a negligible graph, so the load is
   on the server itself), or a random-weight 256 px model exported on the spot (cached between runs).
2. Measures the server's capacity briefly: a closed loop of `--capacity-concurrency` clients (32 for the
   null model, else 4). The client is benchmarks.raw_http (keep-alive, requests prepared as bytes), so
   it takes little of the CPU it shares with the server.
3. Offers `--fraction` of that capacity as an open loop (requests at fixed times whether or not earlier
   ones were answered; latency counts from the scheduled send time) for `--duration` seconds, with the
   bundled cookie photos in turn as request bodies (full pipeline: decode, batch, infer, heatmap PNG).
4. Records per interval: requests, errors, p50/p99 latency and the server process's resident memory.

The run FAILS (exit code 1) when any request errs (non-200, a transport error, or an answer without a
finite score and a heatmap), or when the server's RSS at the end (median of the last interval's samples)
exceeds the post-warm-up baseline by more than `--rss-growth-percent` % + `--rss-growth-mb` MB.
Writes `benchmarks/results/soak-<date>.json` and `.md` (or into `--out-dir`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.environment import describe_device, describe_host, library_versions, load_average
from benchmarks.load import Outcome, arrival_offsets, closed_loop, open_loop, prediction_check
from benchmarks.model_setup import default_cache_dir, prepare_model
from benchmarks.null_model import make_null_model
from benchmarks.raw_http import ConnectionPool, build_request, split_url
from benchmarks.server_process import ServerProcess
from benchmarks.tables import markdown_table
from benchmarks.timing import percentile

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "cookie"
DEFAULT_OUT_DIR = REPO / "benchmarks" / "results"
MIB = 1024 * 1024
SAMPLE_EVERY_S = 1.0  # how often the server's memory is read


@dataclass(frozen=True)
class SoakSettings:
    duration_s: float = 600.0  # open-loop load, warm-up included
    fraction: float = 0.7  # of the measured capacity
    interval_s: float | None = None  # None: 60 s for runs of 10 min or more, else duration / 6 (>= 5 s)
    warmup_s: float | None = None  # None: min(60 s, duration / 5); memory baseline = end of warm-up
    capacity_s: float = 10.0  # closed-loop capacity measurement (after 2 s of warm-up)
    capacity_concurrency: int | None = None  # None: 32 for the null model, else 4 (2-core CPU: more only
    # queues behind a real model; GPUs want ~2x the max batch)
    null_model: bool = False  # serve benchmarks.null_model: the server's own capacity, not the model's
    backend: str = "onnxruntime-cpu"
    max_batch_size: int = 16
    max_batch_delay_ms: float = 0.0  # the server's default: batches form while the previous one runs
    query: str = ""  # /predict query string; default: the full pipeline with a heatmap PNG
    request_timeout_s: float = 30.0  # client-side; the server's own deadline (10 s) answers 504 first
    rss_growth_percent: float = 10.0
    rss_growth_mb: float = 20.0
    seed: int = 0

    def interval(self) -> float:
        if self.interval_s is not None:
            return self.interval_s
        return 60.0 if self.duration_s >= 600 else max(5.0, self.duration_s / 6)

    def concurrency(self) -> int:
        if self.capacity_concurrency is not None:
            return self.capacity_concurrency
        return 32 if self.null_model else 4

    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(60.0, self.duration_s / 5)


@dataclass
class MemorySample:
    at_s: float  # from the start of the load
    rss_bytes: int
    threads: int
    open_files: int


@dataclass
class Interval:
    index: int
    start_s: float
    end_s: float
    warmup: bool
    requests: int
    ok: int
    errors: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    rss_mb: float | None  # median of the samples in the interval
    rss_max_mb: float | None
    threads: int | None
    open_files: int | None


# ----------------------------------------------------------------------------------------- inputs


def sample_images(folder: Path = SAMPLES) -> list[bytes]:
    """Every bundled cookie photo (train + test, good and anomalous) as JPEG bytes, in a fixed order."""
    paths = sorted(folder.glob("train/*/*.jpg")) + sorted(folder.glob("test/*/*.jpg"))
    if not paths:
        raise FileNotFoundError(f"no JPEG photos under {folder}")
    return [path.read_bytes() for path in paths]


# ------------------------------------------------------------------------------- server memory


def read_process(pid: int) -> tuple[int, int, int]:
    """(resident bytes, threads, open file descriptors) of process `pid`, from /proc (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kib = int(fields["VmRSS"].split()[0])
    threads = int(fields["Threads"].strip())
    try:
        open_files = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        open_files = -1
    return rss_kib * 1024, threads, open_files


async def sample_memory(pid: int, origin: float, stop: asyncio.Event, into: list[MemorySample]) -> None:
    """Read the server's memory every SAMPLE_EVERY_S until `stop` is set."""
    while not stop.is_set():
        try:
            rss, threads, open_files = read_process(pid)
        except (OSError, KeyError, ValueError):
            return  # the process is gone: the load loop sees the errors
        into.append(MemorySample(time.perf_counter() - origin, rss, threads, open_files))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)


# ------------------------------------------------------------------------------------ requests


def predict_requests(url: str, images: list[bytes]) -> list[bytes]:
    """One prepared HTTP request per image (POST url, Content-Type image/jpeg)."""
    host, port, path = split_url(url)
    return [
        build_request("POST", path, host=f"{host}:{port}", body=body, headers={"Content-Type": "image/jpeg"})
        for body in images
    ]


OPEN_LOOP_CONNECTIONS = 64  # like a load generator's fixed connections (wrk2, hey -c): never a flood


def _pool(url: str, timeout_s: float, max_connections: int | None = None) -> ConnectionPool:
    host, port, _ = split_url(url)
    return ConnectionPool(host, port, timeout_s=timeout_s, max_connections=max_connections)


async def measure_capacity(
    url: str, images: list[bytes], *, concurrency: int, seconds: float, timeout_s: float, want_heatmap: bool
) -> tuple[float, float | None, Counter[str]]:
    """Closed loop (benchmarks.load): `concurrency` clients back to back for 2 s of warm-up + `seconds`.

    -> (good answers per second in the window, their p50 ms, errors by kind).
    """
    recording = await closed_loop(
        _pool(url, timeout_s),
        predict_requests(url, images),
        concurrency=concurrency,
        warmup_s=2.0,
        duration_s=seconds,
        check=prediction_check(want_heatmap=want_heatmap),
    )
    p50 = percentile(recording.latencies_ms, 50) if recording.latencies_ms else None
    return len(recording.latencies_ms) / max(recording.window_s, 1e-9), p50, recording.errors


async def soak_load(
    url: str,
    images: list[bytes],
    *,
    rate: float,
    duration_s: float,
    pid: int,
    timeout_s: float,
    want_heatmap: bool,
) -> tuple[list[Outcome], list[MemorySample], float]:
    """benchmarks.load's open loop at fixed times for `duration_s`, the server's memory sampled alongside.

    -> (one outcome per request, memory samples, the worst lag of a send behind its schedule in ms).
    """
    samples: list[MemorySample] = []
    stop = asyncio.Event()
    origin = time.perf_counter()
    sampler = asyncio.create_task(sample_memory(pid, origin, stop, samples))
    # up to 64 keep-alive connections: a request scheduled while all are busy waits for one (its latency
    # still counts from its scheduled time); opening ever more connections under a backlog would add
    # connection set-up to a server already behind and tip it over
    outcomes, max_lag_ms = await open_loop(
        _pool(url, timeout_s, OPEN_LOOP_CONNECTIONS),
        predict_requests(url, images),
        offsets=arrival_offsets(rate, duration_s, "fixed"),
        check=prediction_check(want_heatmap=want_heatmap),
    )
    stop.set()
    await sampler
    return outcomes, samples, max_lag_ms


# ------------------------------------------------------------------------------------- analysis


def summarise_intervals(
    outcomes: list[Outcome],
    samples: list[MemorySample],
    *,
    duration_s: float,
    interval_s: float,
    warmup_s: float,
) -> list[Interval]:
    """Requests by scheduled time and memory samples by time, bucketed into intervals of `interval_s`."""
    count = max(1, math.ceil(duration_s / interval_s - 1e-9))
    intervals = []
    for index in range(count):
        start, end = index * interval_s, min(duration_s, (index + 1) * interval_s)
        last = index == count - 1
        inside = [o for o in outcomes if start <= o.scheduled_s < end or (last and o.scheduled_s >= end)]
        good = [o.latency_ms for o in inside if o.error is None]
        errors = Counter(o.error for o in inside if o.error is not None)
        memory = [s for s in samples if start <= s.at_s < end or (last and s.at_s >= end)]
        rss = [s.rss_bytes / MIB for s in memory]
        intervals.append(
            Interval(
                index=index,
                start_s=round(start, 3),
                end_s=round(end, 3),
                warmup=end <= warmup_s + 1e-9,
                requests=len(inside),
                ok=len(good),
                errors=dict(errors),
                p50_ms=_rounded(percentile(good, 50)) if good else None,
                p99_ms=_rounded(percentile(good, 99)) if good else None,
                max_ms=_rounded(max(good)) if good else None,
                rss_mb=_rounded(statistics.median(rss)) if rss else None,
                rss_max_mb=_rounded(max(rss)) if rss else None,
                threads=memory[-1].threads if memory else None,
                open_files=memory[-1].open_files if memory else None,
            )
        )
    return intervals


def memory_growth(
    samples: list[MemorySample],
    *,
    warmup_s: float,
    final_window_s: float,
    duration_s: float,
    growth_percent: float,
    growth_mb: float,
) -> dict[str, Any]:
    """Baseline (median RSS over the last 10 s of warm-up), final (median over the last
    `final_window_s`), peak after warm-up, the allowed bound and the fitted slope in MB/min."""
    if not samples:
        return {"baseline_mb": None, "final_mb": None, "peak_mb": None, "bound_mb": None}

    baseline_window = [s.rss_bytes for s in samples if warmup_s - 10 <= s.at_s <= warmup_s] or [
        samples[0].rss_bytes
    ]
    after = [s for s in samples if s.at_s > warmup_s] or samples[-1:]
    final_window = [s.rss_bytes for s in after if s.at_s >= duration_s - final_window_s] or [
        after[-1].rss_bytes
    ]
    baseline = statistics.median(baseline_window) / MIB
    final = statistics.median(final_window) / MIB
    bound = baseline * (1 + growth_percent / 100) + growth_mb
    slope = _slope_mb_per_min(after)
    return {
        "baseline_mb": _rounded(baseline),
        "final_mb": _rounded(final),
        "peak_mb": _rounded(max(s.rss_bytes for s in after) / MIB),
        "growth_mb": _rounded(final - baseline),
        "growth_percent": _rounded(100 * (final - baseline) / baseline) if baseline else None,
        "bound_mb": _rounded(bound),
        "bound_rule": f"final <= baseline * {1 + growth_percent / 100:g} + {growth_mb:g} MB",
        "slope_mb_per_min": _rounded(slope) if slope is not None else None,
        "threads_start": after[0].threads,
        "threads_end": after[-1].threads,
        "open_files_start": after[0].open_files,
        "open_files_end": after[-1].open_files,
        "within_bound": final <= bound,
    }


def _slope_mb_per_min(samples: list[MemorySample]) -> float | None:
    """Least-squares slope of RSS over time."""
    if len(samples) < 2:
        return None
    times = [s.at_s / 60 for s in samples]
    values = [s.rss_bytes / MIB for s in samples]
    mean_t, mean_v = statistics.fmean(times), statistics.fmean(values)
    spread = sum((t - mean_t) ** 2 for t in times)
    if spread == 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True)) / spread


def _rounded(value: float) -> float:
    return round(float(value), 3)


def load_summary(outcomes: list[Outcome], duration_s: float, max_lag_ms: float) -> dict[str, Any]:
    good = [o.latency_ms for o in outcomes if o.error is None]
    return {
        "requests": len(outcomes),
        "ok": len(good),
        "errors": dict(Counter(o.error for o in outcomes if o.error is not None)),
        "achieved_rps": _rounded(len(good) / duration_s) if duration_s else 0.0,
        "p50_ms": _rounded(percentile(good, 50)) if good else None,
        "p99_ms": _rounded(percentile(good, 99)) if good else None,
        "max_ms": _rounded(max(good)) if good else None,
        "max_send_lag_ms": _rounded(max_lag_ms),
    }


# --------------------------------------------------------------------------------------- the run


def run_soak(
    settings: SoakSettings, *, model_dir: Path | None, out_dir: Path, work_dir: Path
) -> tuple[dict[str, Any], Path, Path]:
    """Start the server, measure capacity, hold the load, write the report -> (report, json, md)."""
    started_at = datetime.datetime.now(datetime.UTC)
    load_start = load_average()
    if settings.null_model:
        model_dir = make_null_model(work_dir / "null-model")
    model = prepare_model(
        model_dir=model_dir,
        run_dir=None,
        work_dir=work_dir,
        model_size="small",
        image_size=256,
        cache_dir=None if model_dir is not None else default_cache_dir(),
    )
    images = sample_images()
    want_heatmap = "heatmap=none" not in settings.query
    log_path = work_dir / "server.log"
    server = ServerProcess(
        model.model_dir,
        log_path=log_path,
        backend=settings.backend,
        max_batch_size=settings.max_batch_size,
        max_batch_delay_ms=settings.max_batch_delay_ms,
        # the null model's graph is tiny: ONNX Runtime's spinning thread pool would only take CPU
        env={"EAD_INTRA_OP_THREADS": "1"} if settings.null_model else None,
    )
    failures: list[str] = []
    with server:
        pid = server_pid(server)
        url = f"{server.url}/predict" + (f"?{settings.query}" if settings.query else "")
        served = server.model_info()
        logger.info("measuring capacity for %.0f s (closed loop, %d clients)", settings.capacity_s,
                    settings.concurrency())  # fmt: skip
        capacity, capacity_p50, capacity_errors = asyncio.run(
            measure_capacity(
                url,
                images,
                concurrency=settings.concurrency(),
                seconds=settings.capacity_s,
                timeout_s=settings.request_timeout_s,
                want_heatmap=want_heatmap,
            )
        )
        if capacity_errors:
            failures.append(f"capacity run: errors {dict(capacity_errors)}")
        if capacity <= 0:
            raise RuntimeError(f"no answer during the capacity run: {dict(capacity_errors)}")
        rate = settings.fraction * capacity
        logger.info("capacity %.1f req/s; soaking at %.1f req/s for %.0f s", capacity, rate,
                    settings.duration_s)  # fmt: skip
        outcomes, samples, max_lag_ms = asyncio.run(
            soak_load(
                url,
                images,
                rate=rate,
                duration_s=settings.duration_s,
                pid=pid,
                timeout_s=settings.request_timeout_s,
                want_heatmap=want_heatmap,
            )
        )
    exit_code = server_exit_code(server)
    log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""

    interval_s, warmup_s = settings.interval(), settings.warmup()
    intervals = summarise_intervals(
        outcomes, samples, duration_s=settings.duration_s, interval_s=interval_s, warmup_s=warmup_s
    )
    memory = memory_growth(
        samples,
        warmup_s=warmup_s,
        final_window_s=min(interval_s, settings.duration_s - warmup_s),
        duration_s=settings.duration_s,
        growth_percent=settings.rss_growth_percent,
        growth_mb=settings.rss_growth_mb,
    )
    load = load_summary(outcomes, settings.duration_s, max_lag_ms)
    failures += judge(load, memory, exit_code)
    error_lines = [
        line
        for line in log_text.splitlines()
        if any(mark in line for mark in ('"level":"ERROR"', '"level": "ERROR"', " ERROR "))
    ]
    report = {
        "kind": "soak",
        "schema_version": 1,
        "created": started_at.isoformat(timespec="seconds"),
        "passed": not failures,
        "failures": failures,
        "device": describe_device(use_gpu=settings.backend != "onnxruntime-cpu"),
        "host": describe_host(load_start),
        "versions": library_versions(),
        "model": model.describe(),
        "server": {
            "backend": served.get("backend"),
            "max_batch_size": served.get("max_batch_size"),
            "max_batch_delay_ms": served.get("max_batch_delay_ms"),
            "exit_code": exit_code,
            "log_error_lines": len(error_lines),
            "log_error_examples": error_lines[:5],
        },
        "settings": {
            **asdict(settings),
            "interval_s": interval_s,
            "warmup_s": warmup_s,
            "images": len(images),
        },
        "capacity": {
            "mode": "closed",
            "concurrency": settings.concurrency(),
            "seconds": settings.capacity_s,
            "rps": _rounded(capacity),
            "p50_ms": _rounded(capacity_p50) if capacity_p50 is not None else None,
            "errors": dict(capacity_errors),
        },
        "load": {
            "mode": "open",
            "arrivals": "fixed",
            "rate_rps": _rounded(rate),
            "fraction": settings.fraction,
            "duration_s": settings.duration_s,
            **load,
        },
        "memory": memory,
        "intervals": [asdict(interval) for interval in intervals],
    }
    json_path, md_path = write_report(report, out_dir)
    return report, json_path, md_path


def judge(load: dict[str, Any], memory: dict[str, Any], exit_code: int | None) -> list[str]:
    """Why the soak failed (empty: it passed): request errors, memory growth, an unclean exit."""
    failures = []
    if load["errors"]:
        failed = sum(load["errors"].values())
        failures.append(f"{failed} of {load['requests']} requests failed: {load['errors']}")
    if memory["baseline_mb"] is None:
        failures.append("no memory samples: the server process was gone when the load started")
    elif not memory["within_bound"]:
        failures.append(
            f"server RSS grew from {memory['baseline_mb']} MB to {memory['final_mb']} MB "
            f"(bound {memory['bound_mb']} MB: {memory['bound_rule']})"
        )
    if exit_code not in (0, None):
        failures.append(f"the server exited with code {exit_code} after SIGTERM")
    return failures


def server_pid(server: ServerProcess) -> int:
    """The pid of the `efficientad serve` process (uvicorn with one worker runs the app in it)."""
    process = getattr(server, "_process", None)
    if process is None:
        raise RuntimeError("the server process is not running")
    return int(process.pid)


def server_exit_code(server: ServerProcess) -> int | None:
    process = getattr(server, "_process", None)
    return None if process is None else process.returncode


# ---------------------------------------------------------------------------------------- report


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = report["created"][:19].replace(":", "-")
    json_path = out_dir / f"soak-{stamp}.json"
    md_path = out_dir / f"soak-{stamp}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{key}: {count}" for key, count in value.items()) or "0"
    return str(value)


def _interval_cells(row: dict[str, Any]) -> list[str]:
    return [
        f"{row['index']}{' (warm-up)' if row['warmup'] else ''}", f"{row['start_s']:g}-{row['end_s']:g}",
        str(row["requests"]), str(row["ok"]), _cell(row["errors"]), _cell(row["p50_ms"]),
        _cell(row["p99_ms"]), _cell(row["max_ms"]), _cell(row["rss_mb"]), _cell(row["rss_max_mb"]),
        _cell(row["threads"]), _cell(row["open_files"]),
    ]  # fmt: skip


def render_markdown(report: dict[str, Any]) -> str:
    load, memory, capacity, model = report["load"], report["memory"], report["capacity"], report["model"]
    verdict = "PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"])
    lines = [
        f"# Soak test {report['created']}: {verdict}",
        "",
        f"- Device: {report['device']['name']}; backend {report['server']['backend']}, max batch "
        f"{report['server']['max_batch_size']}, batch delay {report['server']['max_batch_delay_ms']} ms",
        f"- Model: {model['size']} {model['input_width']}x{model['input_height']} px, {model['weights']} "
        f"weights, version {model['version']}",
        f"- Capacity (closed loop, {capacity['concurrency']} clients, {capacity['seconds']:g} s): "
        f"{capacity['rps']:.1f} req/s (p50 {_cell(capacity['p50_ms'])} ms)",
        f"- Load: open loop at {load['rate_rps']:.1f} req/s ({load['fraction']:.0%} of capacity) for "
        f"{load['duration_s']:g} s; {load['requests']} requests, {load['ok']} good, errors "
        f"{_cell(load['errors'])}; p50 {_cell(load['p50_ms'])} ms, p99 {_cell(load['p99_ms'])} ms, "
        f"max {_cell(load['max_ms'])} ms; worst client send lag {_cell(load['max_send_lag_ms'])} ms",
        f"- Server RSS: baseline {_cell(memory['baseline_mb'])} MB after warm-up, final "
        f"{_cell(memory['final_mb'])} MB, peak {_cell(memory['peak_mb'])} MB, growth "
        f"{_cell(memory.get('growth_mb'))} MB, slope {_cell(memory.get('slope_mb_per_min'))} MB/min; "
        f"bound {_cell(memory['bound_mb'])} MB ({memory.get('bound_rule', '-')})",
        f"- Threads {memory.get('threads_start')} -> {memory.get('threads_end')}, open files "
        f"{memory.get('open_files_start')} -> {memory.get('open_files_end')}; server exit code "
        f"{report['server']['exit_code']}, {report['server']['log_error_lines']} ERROR log lines",
    ]
    header = ["interval", "seconds", "requests", "good", "errors", "p50 ms", "p99 ms", "max ms", "RSS MB"]
    header += ["RSS max MB", "threads", "fds"]
    cells = [_interval_cells(row) for row in report["intervals"]]
    lines += ["", *markdown_table(header, cells)]
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    defaults = SoakSettings()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="model dir to serve (default: random 256 px model)")
    parser.add_argument(
        "--null-model",
        action="store_true",
        help="serve a null model (real contract, negligible graph): the server's own capacity",
    )
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="seconds of load (600)")
    parser.add_argument("--fraction", type=float, default=defaults.fraction, help="of capacity (0.7)")
    parser.add_argument("--interval", type=float, default=None, help="seconds per report row")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before the memory baseline")
    parser.add_argument("--capacity-seconds", type=float, default=defaults.capacity_s)
    parser.add_argument("--capacity-concurrency", type=int, default=defaults.capacity_concurrency)
    parser.add_argument("--backend", default=defaults.backend)
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-batch-delay-ms", type=float, default=defaults.max_batch_delay_ms)
    parser.add_argument("--query", default=defaults.query, help="/predict query, e.g. heatmap=none")
    parser.add_argument("--rss-growth-percent", type=float, default=defaults.rss_growth_percent)
    parser.add_argument("--rss-growth-mb", type=float, default=defaults.rss_growth_mb)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    return parser


def settings_from(args: argparse.Namespace) -> SoakSettings:
    if args.duration <= 0 or not 0 < args.fraction <= 1.5:
        raise SystemExit(
            f"need --duration > 0 and 0 < --fraction <= 1.5; got {args.duration}, {args.fraction}"
        )
    return SoakSettings(
        duration_s=args.duration,
        fraction=args.fraction,
        interval_s=args.interval,
        warmup_s=args.warmup,
        capacity_s=args.capacity_seconds,
        capacity_concurrency=args.capacity_concurrency,
        null_model=args.null_model,
        backend=args.backend,
        max_batch_size=args.max_batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        query=args.query,
        rss_growth_percent=args.rss_growth_percent,
        rss_growth_mb=args.rss_growth_mb,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from(args)
    if settings.null_model and args.model_dir is not None:
        raise SystemExit("--null-model and --model-dir exclude each other")
    with tempfile.TemporaryDirectory(prefix="ead-soak-") as work:
        report, json_path, md_path = run_soak(
            settings, model_dir=args.model_dir, out_dir=args.out_dir, work_dir=Path(work)
        )
    print(render_markdown(report))
    print(f"wrote {json_path} and {md_path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
