"""The one load driver (benchmarks.load): /metrics parsing (on the server's real metrics), arrival schedules,
and the closed and open loops against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest

from benchmarks.load import arrival_offsets, batch_totals, parse_metric_total


def test_batch_totals_from_the_servers_own_metrics() -> None:
    from server.metrics import ServerMetrics

    metrics = ServerMetrics()
    for batch in (1, 3, 8):
        metrics.observe_batch("cookie", batch, 0.01, [0.001] * batch)
    text = metrics.render().decode()
    assert batch_totals(text) == (12.0, 3.0)
    assert parse_metric_total(text, "ead_images_total") == 12.0  # labelled sample {model="cookie"}


def test_parse_metric_total_sums_label_sets_and_ignores_prefix_matches() -> None:
    text = "\n".join([
        "# HELP x_total help",
        'x_total{route="/predict",status="200"} 5.0',
        'x_total{route="/predict",status="503"} 2',
        "x_total_other 100",
        "x_created 1.7e9",
    ])  # fmt: skip
    assert parse_metric_total(text, "x_total") == 7.0
    assert parse_metric_total(text, "missing") == 0.0


def test_fixed_arrivals_are_evenly_spaced() -> None:
    offsets = arrival_offsets(20.0, 2.0, "fixed")
    assert len(offsets) == 40
    assert offsets[1] - offsets[0] == pytest.approx(0.05)
    assert offsets[-1] < 2.0


def test_poisson_arrivals_have_the_asked_rate_and_are_reproducible() -> None:
    offsets = arrival_offsets(100.0, 50.0, "poisson", seed=1)
    assert offsets == arrival_offsets(100.0, 50.0, "poisson", seed=1)
    assert len(offsets) == pytest.approx(5000, rel=0.05)
    assert all(b > a for a, b in itertools.pairwise(offsets)) and offsets[-1] < 50.0
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert sum(gap < 0.002 for gap in gaps) > 0  # bursts: unlike a fixed schedule, some gaps are tiny


def test_arrivals_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="rate"):
        arrival_offsets(0.0, 1.0, "fixed")
    with pytest.raises(ValueError, match="arrivals"):
        arrival_offsets(1.0, 1.0, "bursty")


async def _one_at_a_time_server(seconds: float) -> tuple[asyncio.Server, int]:
    """A real HTTP/1.1 server on loopback that answers one request at a time, `seconds` each, with a
    prediction-like JSON body and a Server-Timing header, keeping connections alive."""
    lock = asyncio.Lock()
    body = json.dumps({"score": 0.5}).encode()
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        f"Server-Timing: inference;dur={seconds * 1000:g}, total;dur={seconds * 1000:g}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in request_head.split(b"\r\n")
                     if line.lower().startswith(b"content-length:")),
                    0,
                )  # fmt: skip
                await reader.readexactly(length)
                async with lock:
                    await asyncio.sleep(seconds)
                writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_closed_loop_waits_for_steady_state_and_a_full_round() -> None:
    """A server that answers one request at a time, 20 ms each: with 4 connections the window opens only
    after each got its first answer, and stays open until 4 answers are in."""
    from benchmarks.load import closed_loop, prediction_check
    from benchmarks.raw_http import ConnectionPool, build_request

    async def scenario() -> tuple:
        server, port = await _one_at_a_time_server(0.02)
        scrapes: list[float] = []

        async def scrape() -> tuple[float, float]:
            scrapes.append(time.perf_counter())
            return (float(len(scrapes)), float(len(scrapes)))

        request = build_request("POST", "/predict", host=f"127.0.0.1:{port}", body=b"x")
        started = time.perf_counter()
        recording = await closed_loop(
            ConnectionPool("127.0.0.1", port), [request], concurrency=4, warmup_s=0.0, duration_s=0.01,
            max_s=10.0, check=prediction_check(want_heatmap=False), scrape=scrape,
        )  # fmt: skip
        server.close()
        await server.wait_closed()
        return started, scrapes, recording

    started, scrapes, recording = asyncio.run(scenario())
    assert scrapes[0] - started >= 4 * 0.02 * 0.9  # a full round of 4 serialised answers came first
    assert recording.answers >= 4 and not recording.errors  # the window stayed open for a full round
    assert all(latency >= 15.0 for latency in recording.latencies_ms)
    assert recording.stages_ms["inference"] == [20.0] * len(recording.latencies_ms)  # Server-Timing kept
    assert len(scrapes) == 2 and recording.batches == (1.0, 1.0)  # the /metrics deltas over the window
    assert recording.window_s >= 4 * 0.02 * 0.9


def test_open_loop_counts_latency_from_the_schedule() -> None:
    """Requests every 5 ms to a server that takes 20 ms each, one at a time: the server falls behind, and
    the latencies grow with the backlog (counted from each scheduled send, not from when a connection
    came free)."""
    from benchmarks.load import open_loop, record_window
    from benchmarks.raw_http import ConnectionPool, build_request

    async def scenario() -> tuple:
        server, port = await _one_at_a_time_server(0.02)
        request = build_request("POST", "/predict", host=f"127.0.0.1:{port}", body=b"x")
        pool = ConnectionPool("127.0.0.1", port, max_connections=4)
        outcomes, lag = await open_loop(pool, [request], offsets=[k * 0.005 for k in range(8)])
        server.close()
        await server.wait_closed()
        return outcomes, lag

    outcomes, lag_ms = asyncio.run(scenario())
    assert [outcome.error for outcome in outcomes] == [None] * 8
    latencies = [outcome.latency_ms for outcome in outcomes]
    assert latencies[-1] > latencies[0] + 80  # 8 x 20 ms of work offered in 40 ms
    assert lag_ms < 20
    recording = record_window(outcomes, 0.01, 1.0, lag_ms)
    assert recording.answers == 6 and recording.window_s >= 0.16 - 0.01
