"""A burst of stalled uploads: `clients` connections each send a request head and two bytes of a larger
body, then nothing. Meanwhile GET /health/live is timed on a connection of its own (as a Kubernetes
probe would: its default timeout is 1 s), and each stalled request's answer (408 from the server once
`body_timeout_s` has passed) is timed from the moment its bytes were sent.

    python -m benchmarks.burst --url http://127.0.0.1:8000 --clients 1000

Run against the server and against the floor app (benchmarks.floor_app) for the same burst; the report
is one JSON object (probe latencies, answers by status and their times).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from benchmarks.raw_http import ConnectionPool, build_request, split_url
from benchmarks.timing import percentile

DECLARED_BODY_BYTES = 1000  # the Content-Length each stalled client announces; it sends two of them


async def _stall(host: str, port: int, path: str, hold_s: float) -> tuple[float, int | None]:
    """One stalled upload -> (seconds from its bytes sent to the answer's first line, its status or None
    when no answer came within `hold_s`)."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return 0.0, -1
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {DECLARED_BODY_BYTES}\r\n\r\n"
    ).encode()
    sent = time.perf_counter()
    try:
        writer.write(head + b"\xff\xd8")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), hold_s)
        status = int(line.split()[1]) if line.startswith(b"HTTP/1.") else None
    except (TimeoutError, OSError, ValueError, IndexError):
        status = None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return time.perf_counter() - sent, status


async def _probe(host: str, port: int, stop: asyncio.Event, every_s: float) -> list[tuple[float, float]]:
    """GET /health/live every `every_s` on a keep-alive connection of its own until `stop`
    -> (perf_counter at its send, seconds to its answer) each."""
    pool = ConnectionPool(host, port, timeout_s=30.0)
    request = build_request("GET", "/health/live", host=f"{host}:{port}")
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        try:
            await pool.exchange(request)
            latencies.append((started, time.perf_counter() - started))
        except (OSError, TimeoutError, ValueError):
            latencies.append((started, float("inf")))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
    pool.close()
    return latencies


async def burst(url: str, *, clients: int, hold_s: float, probe_every_s: float = 0.05) -> dict[str, Any]:
    """The burst against `url` -> probe latencies (s) and the stalled requests' answers."""
    host, port, _ = split_url(url)
    stop = asyncio.Event()
    probe = asyncio.create_task(_probe(host, port, stop, probe_every_s))
    await asyncio.sleep(0.2)  # the probe's connection is open before the burst
    origin = time.perf_counter()
    stalls = await asyncio.gather(*(_stall(host, port, "/predict", hold_s) for _ in range(clients)))
    stop.set()
    probes = await probe
    answered = [seconds for seconds, status in stalls if status is not None and status > 0]
    finite = [seconds for _, seconds in probes if seconds != float("inf")]
    worst_at, worst = max(probes, key=lambda probe: probe[1]) if probes else (origin, None)
    return {
        "clients": clients,
        "probe_count": len(probes),
        "probe_failures": len(probes) - len(finite),
        "probe_p50_s": round(percentile(finite, 50), 4) if finite else None,
        "probe_max_s": None if worst is None else round(worst, 4),
        "probe_max_at_s": round(worst_at - origin, 3),  # when the slowest probe was sent, from the burst
        "statuses": dict(Counter(str(status) for _, status in stalls)),
        "answer_max_s": round(max(answered), 3) if answered else None,
        "answer_p50_s": round(percentile(answered, 50), 3) if answered else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    import uvloop

    parser = argparse.ArgumentParser(prog="python -m benchmarks.burst", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="base URL of the server (or the floor app)")
    parser.add_argument("--clients", type=int, default=1000, help="stalled uploads at once (1000)")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds each waits for its answer (20)")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(burst(args.url, clients=args.clients, hold_s=args.hold))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
