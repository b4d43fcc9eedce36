"""Dynamic batching: the whole policy in one small class.

Requests wait in a bounded queue. One worker task per model runs one batch at a time: whenever the
backend is free and requests are waiting, it takes up to `max_batch_size` of them at once (Triton's
default dynamic batching, queue delay 0), so an idle server adds no queue time and, under load, batches
form from the requests that queued while the previous batch ran. `max_delay_s` > 0 is an optional bound
(off by default): when fewer than `max_batch_size` requests wait, the worker waits for more until the
oldest has waited that long. It stacks the images into one (N, 3, H, W) array and runs inference on the
model's single worker thread (so one backend context is only ever used by one thread), then hands each
request its own result. A failed inference fails only the requests of that batch; cancelled or expired
requests are dropped before inference.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

FAILURES_BEFORE_UNHEALTHY = 3  # batches failed in a row before readiness reports the backend broken

InferFunction = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class QueueFull(Exception):
    """The model's queue is at `max_queue`: the caller should retry later (HTTP 503)."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its result was ready (HTTP 504)."""


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new requests (HTTP 503)."""


class InferenceFailed(Exception):
    """Inference raised for the batch this request was in (HTTP 500)."""


@dataclass
class BatchResult:
    anomaly_map: np.ndarray  # (1, H, W) float32
    score: float
    queue_s: float  # enqueued -> its batch started
    inference_s: float  # the batch's inference call
    batch_size: int


@dataclass
class _Request:
    image: np.ndarray  # (3, H, W) uint8
    future: asyncio.Future[BatchResult]
    enqueued: float  # time.monotonic()
    deadline: float  # time.monotonic(); inf without one


class DynamicBatcher:
    """Collects single-image requests into batches for `infer((N, 3, H, W) uint8) -> (maps, scores)`.

    `max_delay_s` 0 (the default): never wait, run what is queued as soon as the backend is free.
    `max_delay_s` > 0: with fewer than `max_batch_size` queued, wait until the oldest request has waited
    that long (or the batch is full) before running.
    """

    def __init__(
        self,
        infer: InferFunction,
        *,
        executor: Executor,
        max_batch_size: int = 16,
        max_delay_s: float = 0.0,
        max_queue: int = 256,
        name: str = "model",
        metrics: ServerMetrics | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or not (math.isfinite(max_delay_s) and max_delay_s >= 0):
            raise ValueError(
                f"need max_batch_size >= 1, max_queue >= 1, finite max_delay_s >= 0; got {max_batch_size}, "
                f"{max_queue}, {max_delay_s}"
            )
        self.infer = infer
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.name = name
        self.metrics = metrics
        self._pending: deque[_Request] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._running_since: float | None = None  # time.monotonic() when the current inference started
        self._failures_in_a_row = 0
        self._last_failure = 0.0  # time.monotonic() of the last failed batch
        self._last_error = ""
        if metrics is not None:
            metrics.track_queue_length(name, self.queue_length)

    def queue_length(self) -> int:
        return len(self._pending)

    def health_problem(self, *, stall_after_s: float) -> str | None:
        """Why this model cannot answer now (None: it can): an inference call running longer than
        `stall_after_s` (a hung backend), or the last FAILURES_BEFORE_UNHEALTHY batches all failed, the
        last of them less than `stall_after_s` ago (then it is tried again: no permanent exclusion)."""
        now = time.monotonic()
        if self._running_since is not None and now - self._running_since > stall_after_s:
            return f"inference has been running for {now - self._running_since:.1f} s (hung backend?)"
        if self._failures_in_a_row >= FAILURES_BEFORE_UNHEALTHY and now - self._last_failure < stall_after_s:
            return f"the last {self._failures_in_a_row} batches failed ({self._last_error})"
        return None

    async def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._worker is not None:
            raise RuntimeError(f"batcher {self.name!r} already started")
        self._wakeup = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def submit(self, image: np.ndarray, *, timeout_s: float | None = None) -> BatchResult:
        """Queue one (3, H, W) uint8 image and wait for its result (at most `timeout_s`).

        Raises QueueFull, BatcherClosed, DeadlineExceeded or InferenceFailed.
        """
        if self._worker is None or self._wakeup is None:
            raise RuntimeError(f"batcher {self.name!r} is not started")
        if self._closing:
            raise BatcherClosed(f"model {self.name!r} is shutting down")
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"model {self.name!r} has {len(self._pending)} images queued (the limit)")
        now = time.monotonic()
        deadline = now + timeout_s if timeout_s is not None else float("inf")
        request = _Request(image, asyncio.get_running_loop().create_future(), now, deadline)
        self._pending.append(request)
        self._wakeup.set()
        try:
            # on timeout or when the caller is cancelled the future is cancelled: the worker skips it
            return await asyncio.wait_for(request.future, timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no result within {timeout_s * 1000:.0f} ms (queued or running)"
            ) from None

    async def close(self, timeout_s: float | None = None) -> None:
        """Take no new requests, finish the queued ones, then stop the worker.

        After `timeout_s` the worker is cancelled and requests still queued fail with BatcherClosed.
        """
        self._closing = True
        if self._worker is None or self._wakeup is None:
            return
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._worker), timeout_s)
        except TimeoutError:
            logger.warning(
                "batcher %s: %d requests still queued after %.1f s, failing them",
                self.name,
                len(self._pending),
                timeout_s,
            )
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while self._pending:
            request = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(BatcherClosed(f"model {self.name!r} shut down"))

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if batch is None:
                return
            live = self._drop_dead(batch)
            if live:
                await self._run_batch(live)

    async def _collect(self) -> list[_Request] | None:
        """The next batch, called whenever the backend is free; None once closed and empty.

        Waits for a first request, then takes up to max_batch_size queued ones at once; only with
        max_delay_s > 0 and a part-full queue does it first wait until the oldest has waited max_delay_s.
        """
        assert self._wakeup is not None
        while not self._pending:
            if self._closing:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        while (remaining := self._fill_wait_s()) > 0:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        size = min(len(self._pending), self.max_batch_size)
        return [self._pending.popleft() for _ in range(size)]

    def _fill_wait_s(self) -> float:
        """How much longer to wait for a fuller batch: 0 when the delay is off (0), the batch is full,
        the batcher is closing, or the oldest request has already waited max_delay_s."""
        if self.max_delay_s <= 0 or len(self._pending) >= self.max_batch_size or self._closing:
            return 0.0
        return max(0.0, self._pending[0].enqueued + self.max_delay_s - time.monotonic())

    def _drop_dead(self, batch: Sequence[_Request]) -> list[_Request]:
        """Requests still waiting: cancelled ones are skipped, expired ones get DeadlineExceeded."""
        now = time.monotonic()
        live = []
        for request in batch:
            if request.future.done():  # cancelled by its caller (disconnect or deadline)
                continue
            if now >= request.deadline:
                request.future.set_exception(
                    DeadlineExceeded("the request deadline passed while it was queued")
                )
                continue
            live.append(request)
        return live

    async def _run_batch(self, batch: list[_Request]) -> None:
        started = time.monotonic()
        queue_s = [started - request.enqueued for request in batch]
        images = [request.image for request in batch]
        self._running_since = started
        try:
            maps, scores, inference_s = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._infer_stacked, images
            )
        except Exception as error:
            self._failures_in_a_row += 1
            self._last_failure = time.monotonic()
            self._last_error = f"{type(error).__name__}: {error}"
            logger.exception("batch of %d for model %s failed", len(batch), self.name)
            failure = InferenceFailed(
                f"inference failed for a batch of {len(batch)}: {type(error).__name__}: {error}"
            )
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(failure)
            return
        finally:
            self._running_since = None
        self._failures_in_a_row = 0
        if self.metrics is not None:
            self.metrics.observe_batch(self.name, len(batch), inference_s, queue_s)
        for index, request in enumerate(batch):
            if not request.future.done():
                request.future.set_result(
                    BatchResult(maps[index], float(scores[index]), queue_s[index], inference_s, len(batch))
                )

    def _infer_stacked(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
        """On the model's worker thread: stack, infer, check the shapes. -> (maps, scores, seconds)."""
        stacked = np.stack(images)  # (N, 3, H, W) uint8
        started = time.perf_counter()
        maps, scores = self.infer(stacked)
        seconds = time.perf_counter() - started
        count, _, height, width = stacked.shape
        if maps.shape != (count, 1, height, width) or scores.shape != (count,):
            raise ValueError(
                f"backend returned anomaly_map {maps.shape} and score {scores.shape} "
                f"for input {stacked.shape}"
            )
        if not np.isfinite(scores).all():
            raise ValueError(
                f"backend returned non-finite scores {scores.tolist()} for input {stacked.shape}"
            )
        return maps, scores, seconds
