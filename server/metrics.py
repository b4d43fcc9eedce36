"""Prometheus metrics of one app, in the app's own registry (no process-global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The metrics named in the API contract; mean batch size = ead_batch_size_sum / ead_batch_size_count."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ead_requests", "HTTP requests answered", ["route", "status"], registry=self.registry
        )
        self.images = Counter("ead_images", "images scored", ["model"], registry=self.registry)
        self.queue_seconds = Histogram(
            "ead_queue_seconds",
            "time an image waited for its batch",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "ead_inference_seconds",
            "time of one batched inference call",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "ead_batch_size", "images per inference call", buckets=BATCH_SIZE_BUCKETS, registry=self.registry
        )
        self.queue_length = Gauge("ead_queue_length", "images waiting", ["model"], registry=self.registry)
        self.request_seconds = Histogram(
            "ead_request_seconds", "HTTP request time", buckets=LATENCY_BUCKETS, registry=self.registry
        )

    def track_queue_length(self, model: str, length: Callable[[], int]) -> None:
        self.queue_length.labels(model=model).set_function(length)

    def observe_batch(self, model: str, batch_size: int, inference_s: float, queue_s: list[float]) -> None:
        self.batch_size.observe(batch_size)
        self.inference_seconds.observe(inference_s)
        for seconds in queue_s:
            self.queue_seconds.observe(seconds)
        self.images.labels(model=model).inc(batch_size)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.request_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
