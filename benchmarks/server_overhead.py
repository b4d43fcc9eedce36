"""What the server itself costs per request, as a ratio against the floor: a minimal app doing the same
work (benchmarks.floor_app), both serving the same null model (the real model-dir contract, a graph of
~0.1 ms), measured in the same run, interleaved, by the same client (benchmarks.load).

    python -m benchmarks.server_overhead            (also a section of `make bench`)

For each request image (a 256x256 JPEG of a good part: the null map stays below the threshold; the same
photo with parts above the threshold, so regions are found; the 576x768 camera JPEG) and each heatmap
choice (`heatmap=none`, the default jet PNG): closed loops at concurrency 1 (p50 latency) and 32
(requests/s), the server then the floor, `rounds` times; each keeps its best round (lowest p50 at
concurrency 1, most requests/s above). The server's per-stage times come from its Server-Timing header.
GET /health/live of both opens the section: one HTTP round trip through each stack.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.load import Check, closed_loop, prediction_check, status_ok
from benchmarks.null_model import make_null_model
from benchmarks.raw_http import ConnectionPool, build_request, split_url
from benchmarks.server_process import FloorAppProcess, ServerProcess
from benchmarks.tables import markdown_table

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# A full-size camera photo (576x768) from the shared data where it is; else the bundled copy (288x384).
_CAMERA_PHOTOS = (
    REPO.parent / "shared" / "data" / "cookie" / "test" / "anomaly" / "anomaly-10.jpg",
    REPO / "samples" / "cookie" / "test" / "anomaly" / "anomaly-10.jpg",
)
CAMERA_IMAGE = next((path for path in _CAMERA_PHOTOS if path.is_file()), _CAMERA_PHOTOS[-1])
# What issue 20 asks on the good part at 256x256: (heatmap, concurrency) -> the bound on server / floor
# (c1: p50 latency, at most; c32: requests/s, at least).
TARGET_RATIOS = {("none", 1): 1.2, ("none", 32): 0.9, ("png", 1): 1.0, ("png", 32): 1.0}
STAGES = ("read", "decode", "queue", "inference", "heatmap", "json", "total")
HEATMAP_QUERIES = {"none": "heatmap=none", "png": ""}  # "" = the server's default (jet PNG)
LIVE_PATH = "/health/live"
GOOD_PART_RED = 0.45  # the red channel scaled by this: the null map (red / 2550) stays below 0.05
CLIENT = "benchmarks.load closed loop over benchmarks.raw_http (asyncio + uvloop, keep-alive, one process)"


@dataclass(frozen=True)
class OverheadSettings:
    concurrencies: tuple[int, ...] = (1, 32)
    duration_s: float = 3.0  # measured seconds per run
    warmup_s: float = 0.5  # seconds of the same load before each window
    rounds: int = 2  # server then floor, this many times; each keeps its best round
    small_side: int = 256
    camera_image: Path = CAMERA_IMAGE
    workers: int = 1  # server processes (efficientad serve --workers)
    max_batch_size: int = 16
    max_batch_delay_ms: float = 0.0


def small_jpeg(source: Path, side: int) -> bytes:
    """`source` resized to side x side, JPEG quality 90 (as the bench's other HTTP inputs)."""
    from benchmarks.inputs import jpeg_bytes, load_rgb

    return jpeg_bytes(load_rgb(source), side)


def good_part_jpeg(data: bytes) -> bytes:
    """The JPEG with its red channel scaled down: the null model's map stays below its threshold."""
    from benchmarks.inputs import JPEG_QUALITY

    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB")).copy()  # (H, W, 3)
    pixels[..., 0] = (pixels[..., 0] * GOOD_PART_RED).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def overhead_images(settings: OverheadSettings) -> dict[str, bytes]:
    """The request bodies by label: the good part, the same photo with regions, the camera JPEG."""
    small = small_jpeg(settings.camera_image, settings.small_side)
    camera = settings.camera_image.read_bytes()
    return {
        f"{_jpeg_label(small)}, good part": good_part_jpeg(small),
        f"{_jpeg_label(small)}, parts above": small,
        f"{_jpeg_label(camera)}, camera": camera,
    }


def _jpeg_label(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return f"{width}x{height} JPEG"


def _best(runs: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """The best round: the lowest p50 at concurrency 1, the most requests/s above."""
    if concurrency == 1:
        return min(runs, key=lambda run: run["p50_ms"] if run["p50_ms"] is not None else float("inf"))
    return max(runs, key=lambda run: run["throughput_rps"])


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator is not None and denominator else None


async def _load(url: str, request: bytes, concurrency: int, check: Check, settings: OverheadSettings) -> Any:
    host, port, _ = split_url(url)
    recording = await closed_loop(
        ConnectionPool(host, port),
        [request],
        concurrency=concurrency,
        warmup_s=settings.warmup_s,
        duration_s=settings.duration_s,
        check=check,
    )
    return recording.summary()


async def _measure_pair(
    urls: dict[str, str], path: str, body: bytes | None, concurrency: int, settings: OverheadSettings
) -> dict[str, dict[str, Any]]:
    """The server and the floor, alternating for `rounds` rounds -> each one's best round."""
    runs: dict[str, list[dict[str, Any]]] = {app: [] for app in urls}
    for _ in range(settings.rounds):
        for app, url in urls.items():
            host, port, _ = split_url(url)
            if body is None:
                request, check = build_request("GET", path, host=f"{host}:{port}"), status_ok
            else:
                headers = {"Content-Type": "image/jpeg"}
                request = build_request("POST", path, host=f"{host}:{port}", body=body, headers=headers)
                check = prediction_check(want_heatmap="heatmap=none" not in path)
            runs[app].append(await _load(url, request, concurrency, check, settings))
    return {app: _best(app_runs, concurrency) for app, app_runs in runs.items()}


def _row(target: str, image: str | None, heatmap: str | None, concurrency: int, best: dict) -> dict:
    server, floor = best["server"], best["floor"]
    return {
        "target": target,
        "image": image,
        "heatmap": heatmap,
        "concurrency": concurrency,
        "requests": server["ok"],
        "errors": server["errors"],
        "p50_ms": server["p50_ms"],
        "p99_ms": server["p99_ms"],
        "mean_ms": server["mean_ms"],
        "throughput_rps": server["throughput_rps"],
        "stages_p50_ms": {stage: server["stages_p50_ms"][stage] for stage in STAGES
                          if stage in server["stages_p50_ms"]},
        "live_ratio": None,
        "floor_p50_ms": floor["p50_ms"],
        "floor_p99_ms": floor["p99_ms"],
        "floor_throughput_rps": floor["throughput_rps"],
        "floor_errors": floor["errors"],
        "p50_ratio": _ratio(server["p50_ms"], floor["p50_ms"]),
        "throughput_ratio": _ratio(server["throughput_rps"], floor["throughput_rps"]),
    }  # fmt: skip


async def _measure(urls: dict[str, str], images: dict[str, bytes], settings: OverheadSettings) -> list[dict]:
    rows: list[dict[str, Any]] = []
    live: dict[int, float] = {}
    for concurrency in settings.concurrencies:
        row = _row(
            "live", None, None, concurrency, await _measure_pair(urls, LIVE_PATH, None, concurrency, settings)
        )
        live[concurrency] = row["throughput_rps"]
        rows.append(row)
        logger.info("live c%d: p50 %s ms vs floor %s ms", concurrency, row["p50_ms"], row["floor_p50_ms"])
    for label, body in images.items():
        for heatmap, query in HEATMAP_QUERIES.items():
            path = "/predict" + (f"?{query}" if query else "")
            for concurrency in settings.concurrencies:
                best = await _measure_pair(urls, path, body, concurrency, settings)
                row = _row("predict", label, heatmap, concurrency, best)
                row["live_ratio"] = _ratio(row["throughput_rps"], live.get(concurrency))
                rows.append(row)
                logger.info(
                    "%s heatmap=%s c%d: p50 %s ms (floor %s, %sx), %.0f req/s (floor %.0f, %sx)",
                    label,
                    heatmap,
                    concurrency,
                    row["p50_ms"],
                    row["floor_p50_ms"],
                    row["p50_ratio"],
                    row["throughput_rps"],
                    row["floor_throughput_rps"],
                    row["throughput_ratio"],
                )
    return rows


def _run_loop(coroutine: Any) -> Any:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def bench_server_overhead(
    settings: OverheadSettings, *, work_dir: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Start the server and the floor app on a fresh null model in `work_dir`, run every load, return the
    section."""
    model_dir = make_null_model(work_dir / "null-model")
    images = overhead_images(settings)
    server = ServerProcess(
        model_dir,
        log_path=work_dir / "server-overhead.log",
        backend="onnxruntime-cpu",
        max_batch_size=settings.max_batch_size,
        max_batch_delay_ms=settings.max_batch_delay_ms,
        workers=settings.workers,
        log_level="INFO",  # the server's default: one access line per request, as in production
        env=env,
    )
    floor = FloorAppProcess(model_dir, log_path=work_dir / "floor-app.log", env=env)
    with server, floor:
        rows = _run_loop(_measure({"server": server.url, "floor": floor.url}, images, settings))
    return {
        "what": "the server's own cost per request as a ratio against a minimal app doing the same work "
        "(benchmarks.floor_app), both on a null model (real contract, ~0.1 ms graph), onnxruntime-cpu, "
        "measured in the same run, interleaved, best of the rounds",
        "client": CLIENT,
        "server_workers": settings.workers,
        "max_batch_size": settings.max_batch_size,
        "max_batch_delay_ms": settings.max_batch_delay_ms,
        "duration_s": settings.duration_s,
        "warmup_s": settings.warmup_s,
        "rounds": settings.rounds,
        "rows": rows,
    }


def targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 20's bounds on the good part at 256x256, each with what was measured and whether it was met."""
    rows = [row for row in section["rows"] if row["target"] == "predict"]
    good = rows[0]["image"] if rows else None
    checks = []
    for (heatmap, concurrency), bound in TARGET_RATIOS.items():
        row = next(
            (r for r in rows if (r["image"], r["heatmap"], r["concurrency"]) == (good, heatmap, concurrency)),
            None,
        )
        latency = concurrency == 1
        value = None if row is None else row["p50_ratio" if latency else "throughput_ratio"]
        checks.append({
            "what": f"heatmap={heatmap}, c{concurrency} "
            + ("p50 server / floor" if latency else "req/s server / floor"),
            "bound": f"<= {bound}" if latency else f">= {bound}",
            "measured": value,
            "met": value is not None and (value <= bound if latency else value >= bound),
        })  # fmt: skip
    return checks


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def overhead_markdown(section: dict[str, Any]) -> list[str]:
    """The section as Markdown: one row per load (server, floor, ratio), the server's stage p50s, the
    targets."""
    header = ["target", "image", "heatmap", "c", "p50 ms", "floor p50 ms", "p50 x floor", "req/s"]
    header += ["floor req/s", "req/s x floor", *(f"{stage} p50" for stage in STAGES), "errors"]
    cells = []
    for row in section["rows"]:
        stages = row.get("stages_p50_ms") or {}
        errors = {**row["errors"], **{f"floor {k}": v for k, v in (row.get("floor_errors") or {}).items()}}
        cells.append(
            [
                "/predict" if row["target"] == "predict" else LIVE_PATH,
                row["image"] or "-",
                row["heatmap"] or "-",
                str(row["concurrency"]),
                _cell(row["p50_ms"]),
                _cell(row.get("floor_p50_ms")),
                _cell(row.get("p50_ratio")),
                f"{row['throughput_rps']:.0f}",
                _cell(row.get("floor_throughput_rps")),
                _cell(row.get("throughput_ratio")),
                *(_cell(stages.get(stage)) for stage in STAGES),
                ", ".join(f"{kind}: {count}" for kind, count in errors.items()) or "0",
            ]
        )
    lines = [
        f"### Server overhead against the floor (null model, {section['server_workers']} worker(s), "
        f"{section['duration_s']:g} s per run, best of {section.get('rounds', 1)} interleaved rounds; "
        f"client: {section['client']})",
        "",
        *markdown_table(header, cells),
        "",
        "Targets (issue 20, good part, 256x256 JPEG):",
        "",
    ]
    for check in targets(section):
        verdict = "met" if check["met"] else "NOT met"
        lines.append(f"- {check['what']}: {_cell(check['measured'])} ({check['bound']}): {verdict}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.environment import describe_host, load_average

    parser = argparse.ArgumentParser(prog="python -m benchmarks.server_overhead", description=__doc__)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run (3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of load before each window (0.5)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best is kept (2)")
    parser.add_argument("--concurrency", default="1,32", help="closed-loop levels (1,32)")
    parser.add_argument("--workers", type=int, default=1, help="server processes (1)")
    parser.add_argument("--out", type=Path, help="write the section as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = OverheadSettings(
        concurrencies=tuple(int(part) for part in args.concurrency.split(",")),
        duration_s=args.duration,
        warmup_s=args.warmup,
        rounds=args.rounds,
        workers=args.workers,
    )
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="efficientad-overhead-") as work:
        section = bench_server_overhead(settings, work_dir=Path(work))
    section["host"] = describe_host(load_start, None)
    section["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    section["targets"] = targets(section)
    if args.out:
        args.out.write_text(json.dumps(section, indent=2) + "\n")
    print("\n".join(overhead_markdown(section)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
