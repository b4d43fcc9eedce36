"""DynamicBatcher: batching, one result per request, failure isolation, queue limit, deadlines, cancellation,
graceful close, metrics, and the delay policy (0 = never wait when idle; > 0 = wait at most that long for a
fuller batch). The inference function is a small deterministic numpy computation so each result can be
checked against its own input; the batcher is the real thing under test."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from server.batcher import BatcherClosed, DeadlineExceeded, DynamicBatcher, InferenceFailed, QueueFull
from server.metrics import ServerMetrics

SIZE = 8
MARKED = 255  # an image filled with this value makes the recording backend raise


class RecordingInference:
    """(N,3,H,W) uint8 -> map = channel mean / 255, score = max of the map; records every batch it ran.

    `gate` (when set up) blocks each call until released, to hold the worker busy.
    """

    def __init__(self, *, gated: bool = False) -> None:
        self.batches: list[list[int]] = []  # the first pixel of each image, per batch
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.entered.set()
        self.gate.wait(timeout=30)
        self.threads.add(threading.current_thread().name)
        self.batches.append([int(image[0, 0, 0]) for image in images])
        if np.any(np.all(images.reshape(len(images), -1) == MARKED, axis=1)):
            raise RuntimeError("marked input")
        maps = images.astype(np.float32).mean(axis=1, keepdims=True) / 255.0  # (N, 1, H, W)
        return maps, maps.reshape(len(images), -1).max(axis=1)


class SlowInference(RecordingInference):
    """RecordingInference that takes `seconds` per batch (a stand-in for a real backend's batch time) and
    records when each call started (time.monotonic())."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.started: list[float] = []

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.started.append(time.monotonic())
        time.sleep(self.seconds)
        return super().__call__(images)


def image(value: int) -> np.ndarray:
    pixels = np.full((3, SIZE, SIZE), value, dtype=np.uint8)  # (3, H, W)
    pixels[:, 1, 1] = min(255, value + 1)  # so the score (max) differs from the first pixel
    return pixels


def expected_score(value: int) -> float:
    return min(255, value + 1) / 255.0


def run(coroutine_function: Any, infer: RecordingInference, **options: Any) -> Any:
    """Run `coroutine_function(batcher)` with a started batcher on a fresh event loop; closes both."""

    async def main() -> Any:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-worker") as executor:
            batcher = DynamicBatcher(infer, executor=executor, **options)
            await batcher.start()
            try:
                return await coroutine_function(batcher)
            finally:
                infer.gate.set()
                await batcher.close(timeout_s=10)

    return asyncio.run(main())


def test_concurrent_requests_share_batches_and_each_gets_its_own_result() -> None:
    infer = RecordingInference()

    async def scenario(batcher: DynamicBatcher) -> list[Any]:
        return await asyncio.gather(*(batcher.submit(image(value)) for value in range(20)))

    results = run(scenario, infer, max_batch_size=8, max_delay_s=0.05)
    assert [result.score for result in results] == pytest.approx([expected_score(v) for v in range(20)])
    for value, result in enumerate(results):
        assert result.anomaly_map.shape == (1, SIZE, SIZE)
        assert result.anomaly_map[0, 0, 0] == pytest.approx(value / 255.0)
    assert [len(batch) for batch in infer.batches] == [8, 8, 4]
    assert [value for batch in infer.batches for value in batch] == list(range(20))  # FIFO
    assert {result.batch_size for result in results[:8]} == {8}
    assert infer.threads == {"model-worker_0"}  # inference only ever on the model's one thread


def test_a_lone_request_waits_at_most_about_the_delay() -> None:
    infer = RecordingInference()

    async def scenario(batcher: DynamicBatcher) -> float:
        started = time.monotonic()
        await batcher.submit(image(3))
        return time.monotonic() - started

    elapsed = run(scenario, infer, max_batch_size=16, max_delay_s=0.05)
    assert 0.04 <= elapsed < 2.0
    assert infer.batches == [[3]]


def _lone_request_waits(max_delay_s: float | None, rounds: int) -> tuple[list[float], list[float]]:
    """`rounds` lone requests, one after the other on an idle batcher (20 ms per batch; max_delay_s None:
    the default) -> (submit -> start of the inference call, the result's own queue_s) per request, in s."""
    infer = SlowInference(0.02)

    async def scenario(batcher: DynamicBatcher) -> tuple[list[float], list[float]]:
        to_inference, queue_s = [], []
        for value in range(rounds):
            await asyncio.sleep(0.005)  # the worker is idle, waiting for work
            submitted = time.monotonic()
            result = await batcher.submit(image(value))
            to_inference.append(infer.started[-1] - submitted)
            queue_s.append(result.queue_s)
            assert result.batch_size == 1 and result.score == pytest.approx(expected_score(value))
        return to_inference, queue_s

    delay = {} if max_delay_s is None else {"max_delay_s": max_delay_s}
    return run(scenario, infer, max_batch_size=16, **delay)


def test_an_idle_batcher_runs_a_lone_request_at_once_by_default() -> None:
    with ThreadPoolExecutor(max_workers=1) as executor:
        assert DynamicBatcher(RecordingInference(), executor=executor).max_delay_s == 0
    to_inference, queue_s = _lone_request_waits(None, rounds=9)
    # medians, so one stall of this (possibly busy) machine cannot fail the test; the old behaviour
    # (waiting out the delay) would show as >= the delay in every round
    assert float(np.median(queue_s)) < 0.005
    assert float(np.median(to_inference)) < 0.005
    assert max(queue_s) < 0.5


def test_a_positive_delay_still_makes_a_lone_request_wait_for_company() -> None:
    to_inference, queue_s = _lone_request_waits(0.05, rounds=3)
    assert min(queue_s) >= 0.04  # waited (about) the whole bound: nobody else came
    assert min(to_inference) >= 0.04
    assert max(queue_s) < 2.0


def test_concurrent_submitters_fill_batches_with_no_delay() -> None:
    """32 closed-loop clients against 20 ms per batch, max batch 16, delay 0: batches form from what
    queued while the previous batch ran, so they are big although the batcher never waits."""
    infer = SlowInference(0.02)
    clients, rounds = 32, 4

    async def client(batcher: DynamicBatcher, number: int) -> list[tuple[int, Any]]:
        answers = []
        for round_ in range(rounds):
            value = number * rounds + round_  # 0..127: unique per request, never MARKED
            answers.append((value, await batcher.submit(image(value))))
        return answers

    async def scenario(batcher: DynamicBatcher) -> list[tuple[int, Any]]:
        per_client = await asyncio.gather(*(client(batcher, number) for number in range(clients)))
        return [answer for answers in per_client for answer in answers]

    answers = run(scenario, infer, max_batch_size=16, max_delay_s=0.0)
    assert len(answers) == clients * rounds
    for value, result in answers:  # each request got its own result
        assert result.score == pytest.approx(expected_score(value))
        assert result.anomaly_map[0, 0, 0] == pytest.approx(value / 255.0)
    sizes = [len(batch) for batch in infer.batches]
    assert sorted(v for batch in infer.batches for v in batch) == list(range(clients * rounds))
    assert max(sizes) <= 16
    assert sum(sizes) / len(sizes) >= 8, sizes


def test_a_positive_delay_waits_for_a_fuller_batch_and_runs_it_once_full() -> None:
    infer = RecordingInference()

    async def scenario(batcher: DynamicBatcher) -> tuple[list[Any], float]:
        started = time.monotonic()
        first = asyncio.ensure_future(batcher.submit(image(1)))
        await asyncio.sleep(0.03)  # well inside the 2 s bound: the worker is still waiting for more
        assert not first.done() and infer.batches == []
        rest = [asyncio.ensure_future(batcher.submit(image(v))) for v in (2, 3)]
        await asyncio.sleep(0.03)
        assert not first.done() and infer.batches == []
        last = asyncio.ensure_future(batcher.submit(image(4)))  # the batch is full: it runs at once
        results = await asyncio.gather(first, *rest, last)
        return results, time.monotonic() - started

    results, elapsed = run(scenario, infer, max_batch_size=4, max_delay_s=2.0)
    assert infer.batches == [[1, 2, 3, 4]]
    assert [result.batch_size for result in results] == [4, 4, 4, 4]
    assert results[0].queue_s >= 0.05  # the first one waited for the others
    assert elapsed < 1.5  # a full batch does not sit out the rest of the bound


def test_a_failing_batch_fails_only_its_own_requests() -> None:
    infer = RecordingInference()

    async def scenario(batcher: DynamicBatcher) -> list[Any]:
        values = [1, MARKED, 2, 3, 4]  # batches of 2: [1, MARKED] fails, [2, 3] and [4] succeed
        return await asyncio.gather(*(batcher.submit(image(v)) for v in values), return_exceptions=True)

    results = run(scenario, infer, max_batch_size=2, max_delay_s=0.05)
    assert infer.batches == [[1, MARKED], [2, 3], [4]]
    assert isinstance(results[0], InferenceFailed) and isinstance(results[1], InferenceFailed)
    assert "marked input" in str(results[0])
    assert [result.score for result in results[2:]] == pytest.approx([expected_score(v) for v in (2, 3, 4)])


def test_full_queue_raises_queue_full_and_the_queued_work_still_completes() -> None:
    infer = RecordingInference(gated=True)

    async def scenario(batcher: DynamicBatcher) -> tuple[list[Any], Exception]:
        busy = asyncio.ensure_future(batcher.submit(image(1)))
        await asyncio.to_thread(infer.entered.wait, 10)  # the worker holds request 1 in inference
        queued = [asyncio.ensure_future(batcher.submit(image(v))) for v in (2, 3)]
        await asyncio.sleep(0)
        assert batcher.queue_length() == 2
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(image(4))
        infer.gate.set()
        return await asyncio.gather(busy, *queued), refused.value

    results, error = run(scenario, infer, max_batch_size=4, max_delay_s=0.001, max_queue=2)
    assert "2 images queued" in str(error)
    assert [result.score for result in results] == pytest.approx([expected_score(v) for v in (1, 2, 3)])
    assert [v for batch in infer.batches for v in batch] == [1, 2, 3]  # 4 never reached the backend


def test_expired_and_cancelled_requests_are_dropped_before_inference() -> None:
    infer = RecordingInference(gated=True)

    async def scenario(batcher: DynamicBatcher) -> Any:
        busy = asyncio.ensure_future(batcher.submit(image(1)))
        await asyncio.to_thread(infer.entered.wait, 10)
        with pytest.raises(DeadlineExceeded, match="no result within 50 ms"):
            await batcher.submit(image(2), timeout_s=0.05)  # expires while the worker is busy
        cancelled = asyncio.ensure_future(batcher.submit(image(3)))
        kept = asyncio.ensure_future(batcher.submit(image(4)))
        await asyncio.sleep(0.01)
        cancelled.cancel()  # e.g. the client disconnected
        infer.gate.set()
        await busy
        return await kept

    result = run(scenario, infer, max_batch_size=8, max_delay_s=0.001)
    assert result.score == pytest.approx(expected_score(4))
    assert infer.batches == [[1], [4]]  # 2 (expired) and 3 (cancelled) were never run


def test_close_finishes_queued_work_then_refuses_new_requests() -> None:
    infer = RecordingInference()

    async def scenario(batcher: DynamicBatcher) -> tuple[list[Any], float]:
        pending = [asyncio.ensure_future(batcher.submit(image(v))) for v in (5, 6, 7)]
        await asyncio.sleep(0.01)
        started = time.monotonic()
        await batcher.close(timeout_s=10)
        closing_s = time.monotonic() - started
        with pytest.raises(BatcherClosed):
            await batcher.submit(image(8))
        return await asyncio.gather(*pending), closing_s

    results, closing_s = run(scenario, infer, max_batch_size=8, max_delay_s=5.0)
    assert [result.score for result in results] == pytest.approx([expected_score(v) for v in (5, 6, 7)])
    assert closing_s < 2.0  # close does not sit out the 5 s batch delay


def test_a_backend_returning_wrong_shapes_fails_the_batch() -> None:
    def bad_infer(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((len(images), 1, 2, 2), np.float32), np.zeros(len(images), np.float32)

    async def main() -> None:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = DynamicBatcher(bad_infer, executor=executor, max_batch_size=2, max_delay_s=0.001)
            await batcher.start()
            with pytest.raises(InferenceFailed, match=r"anomaly_map \(1, 1, 2, 2\)"):
                await batcher.submit(image(1))
            await batcher.close()

    asyncio.run(main())


def test_batch_metrics_are_recorded() -> None:
    metrics = ServerMetrics()
    infer = RecordingInference()

    async def scenario(batcher: DynamicBatcher) -> None:
        await asyncio.gather(*(batcher.submit(image(v)) for v in range(6)))

    run(scenario, infer, max_batch_size=4, max_delay_s=0.05, metrics=metrics, name="m")
    value = metrics.registry.get_sample_value
    assert value("ead_batch_size_count") == len(infer.batches) == 2
    assert value("ead_batch_size_sum") == 6
    assert value("ead_queue_seconds_count") == 6
    assert value("ead_inference_seconds_count") == 2
    assert value("ead_images_total", {"model": "m"}) == 6
    assert value("ead_queue_length", {"model": "m"}) == 0


def test_bad_configuration_is_refused() -> None:
    with ThreadPoolExecutor(max_workers=1) as executor, pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(RecordingInference(), executor=executor, max_batch_size=0)
    with ThreadPoolExecutor(max_workers=1) as executor:
        for delay in (-0.001, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="max_delay_s"):
                DynamicBatcher(RecordingInference(), executor=executor, max_delay_s=delay)
