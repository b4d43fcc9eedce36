"""The load client's pieces: /metrics parsing (on the server's real metrics) and arrival schedules."""

from __future__ import annotations

import itertools

import pytest

from benchmarks.http_load import arrival_offsets, batch_totals, parse_metric_total


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


def test_closed_loop_waits_for_steady_state_and_a_full_round() -> None:
    """A server that answers one request at a time, 20 ms each: with 4 workers the window must open only
    after each worker got its first answer, and stay open until 4 answers are in."""
    import asyncio
    import time

    import httpx

    from benchmarks.http_load import closed_loop

    async def scenario() -> tuple:
        lock = asyncio.Lock()

        async def one_at_a_time(request: httpx.Request) -> httpx.Response:
            async with lock:
                await asyncio.sleep(0.02)
            timings = {"decode": 1.0, "queue": 2.0, "inference": 20.0, "encode": 1.0, "total": 24.0}
            return httpx.Response(200, json={"score": 0.5, "timings_ms": timings})

        scrapes = []

        async def scrape() -> tuple[float, float]:
            scrapes.append(time.perf_counter())
            return (float(len(scrapes)), float(len(scrapes)))

        async with httpx.AsyncClient(transport=httpx.MockTransport(one_at_a_time)) as client:
            started = time.perf_counter()
            result = await closed_loop(
                client, "http://test/predict", b"x", {}, concurrency=4, warmup_s=0.0, duration_s=0.01,
                max_s=10.0, scrape=scrape,
            )  # fmt: skip
        return started, result, scrapes

    started, (recorder, window, before, after), scrapes = asyncio.run(scenario())
    assert window.start - started >= 4 * 0.02 * 0.9  # a full round of 4 serialised answers came first
    assert recorder.sent >= 4 and not recorder.errors  # the window stayed open for a full round
    assert all(latency >= 15.0 for latency in recorder.latencies_ms)
    assert recorder.server_ms["inference"] == [20.0] * recorder.sent  # the answers' own timings are kept
    assert len(scrapes) == 2 and before == (1.0, 1.0) and after == (2.0, 2.0)
    assert window.end - window.start >= 4 * 0.02 * 0.9
