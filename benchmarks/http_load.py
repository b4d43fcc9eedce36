"""The HTTP load client as its own process (`python -m benchmarks.http_load ...`), so the client's CPU time
never shares an interpreter (or a GIL) with the server: benchmarks.load's closed or open loop over
/predict, the mean batch size the server formed in the window from /metrics, one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.load import (
    arrival_offsets,
    closed_loop,
    metrics_scrape,
    open_loop,
    prediction_check,
    record_window,
)
from benchmarks.raw_http import ConnectionPool, build_request, split_url

# Server-Timing names -> the names of the answer's own timings_ms (what the report reads)
SERVER_STAGES = {
    "decode": "decode",
    "queue": "queue",
    "inference": "inference",
    "heatmap": "encode",
    "total": "total",
}


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    """One closed or open loop as the arguments say -> the JSON object main prints."""
    host, port, _ = split_url(args.url.rstrip("/"))
    path = "/predict" + (f"?{args.query}" if args.query else "")
    headers = {"Content-Type": args.content_type}
    if args.api_key:
        headers["X-API-Key"] = args.api_key
    body = Path(args.image).read_bytes()
    request = build_request("POST", path, host=f"{host}:{port}", body=body, headers=headers)
    check = prediction_check(want_heatmap=False)
    scrape = metrics_scrape(host, port)
    if args.mode == "closed":
        recording = await closed_loop(
            ConnectionPool(host, port, timeout_s=args.timeout),
            [request],
            concurrency=args.concurrency,
            warmup_s=args.warmup,
            duration_s=args.duration,
            max_s=max(args.max_seconds, args.warmup + args.duration),
            check=check,
            scrape=scrape,
        )
    else:
        pool = ConnectionPool(host, port, timeout_s=args.timeout, max_connections=args.max_connections)
        offsets = arrival_offsets(args.rate, args.warmup + args.duration, args.arrivals, args.seed)

        async def scrape_at(moment_s: float) -> tuple[float, float] | None:
            await asyncio.sleep(moment_s)
            return await scrape()

        scrapes = asyncio.gather(scrape_at(args.warmup), scrape_at(args.warmup + args.duration))
        outcomes, max_lag_ms = await open_loop(
            pool, [request], offsets=offsets, check=check, keep_stages=True
        )
        recording = record_window(outcomes, args.warmup, args.warmup + args.duration, max_lag_ms)
        before, after = await scrapes
        if before is not None and after is not None:
            recording.batches = (after[0] - before[0], after[1] - before[1])
    result = recording.summary()
    stages = result.pop("stages_p50_ms")
    return {
        "mode": args.mode,
        "concurrency": args.concurrency if args.mode == "closed" else None,
        "rate": args.rate if args.mode == "open" else None,
        "arrivals": args.arrivals if args.mode == "open" else None,
        **result,
        "server_p50_ms": {name: stages[stage] for stage, name in SERVER_STAGES.items() if stage in stages},
        "client": "benchmarks.load over benchmarks.raw_http (keep-alive, its own process)",
    }


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
        help="closed loop: cap on warm-up + window (see benchmarks.load.closed_loop)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import uvloop

    args = build_parser().parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run_load(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
