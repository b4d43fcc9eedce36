"""Prometheus metrics of one app, in the app's own registry (no process-global state)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# ead_anomaly_score buckets: multiples of the model's threshold (dense around it, where drift shows first)
SCORE_BUCKETS_PER_THRESHOLD = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)
SCORE_BUCKETS_WITHOUT_THRESHOLD = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def score_buckets(threshold: float | None) -> tuple[float, ...]:
    """Upper bounds of the score histogram for a model with this threshold."""
    if threshold is None or not threshold > 0:
        return SCORE_BUCKETS_WITHOUT_THRESHOLD
    return tuple(float(f"{threshold * factor:.6g}") for factor in SCORE_BUCKETS_PER_THRESHOLD)


class ScoreHistograms(Collector):
    """`ead_anomaly_score{model}`: one histogram per model with its own buckets (placed around its
    threshold), which a prometheus_client Histogram cannot do (one bucket set for all label values)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, tuple[tuple[float, ...], list[int], list[float]]] = {}

    def set_model(self, model: str, threshold: float | None) -> None:
        """(Re)start the model's histogram with buckets for `threshold` (after a reload: a reset)."""
        buckets = score_buckets(threshold)
        with self._lock:
            current = self._models.get(model)
            if current is None or current[0] != buckets:
                self._models[model] = (buckets, [0] * (len(buckets) + 1), [0.0])

    def observe(self, model: str, score: float) -> None:
        with self._lock:
            entry = self._models.get(model)
            if entry is None:
                return
            buckets, counts, total = entry
            counts[bisect.bisect_left(buckets, score)] += 1  # the first bucket with le >= score
            total[0] += score

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "ead_anomaly_score",
            "image anomaly scores per model (buckets around its threshold)",
            labels=["model"],
        )
        with self._lock:
            snapshot = {model: (b, list(c), t[0]) for model, (b, c, t) in self._models.items()}
        for model, (buckets, counts, total) in snapshot.items():
            cumulative, rows = 0, []
            for bound, count in zip(buckets, counts, strict=False):
                cumulative += count
                rows.append((repr(bound), cumulative))
            rows.append(("+Inf", cumulative + counts[-1]))
            family.add_metric([model], rows, sum_value=total)
        yield family


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
        self.predictions = Counter(
            "ead_predictions",
            "images answered, by the verdict at the threshold in use (ok also when there is none)",
            ["model", "verdict"],
            registry=self.registry,
        )
        self.scores = ScoreHistograms()
        self.registry.register(self.scores)
        # label children looked up once per label set, not per request (`.labels()` takes a lock)
        self._children: dict[tuple[object, ...], Counter] = {}

    def _child(self, counter: Counter, *labels: str) -> Counter:
        key = (counter, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        return child

    def track_model(self, model: str, threshold: float | None) -> None:
        """Start (or, after a reload with a new threshold, restart) the model's score histogram."""
        self.scores.set_model(model, threshold)

    def observe_prediction(self, model: str, score: float, is_anomaly: bool) -> None:
        self.scores.observe(model, score)
        self._child(self.predictions, model, "anomaly" if is_anomaly else "ok").inc()

    def track_queue_length(self, model: str, length: Callable[[], int]) -> None:
        self.queue_length.labels(model=model).set_function(length)

    def observe_batch(self, model: str, batch_size: int, inference_s: float, queue_s: list[float]) -> None:
        self.batch_size.observe(batch_size)
        self.inference_seconds.observe(inference_s)
        for seconds in queue_s:
            self.queue_seconds.observe(seconds)
        self._child(self.images, model).inc(batch_size)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self._child(self.requests, route, str(status)).inc()
        self.request_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
