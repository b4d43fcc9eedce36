"""Fault injection: the real server (uvicorn on loopback, ONNX Runtime on the CPU) with its backend wrapped
so that chosen inference calls raise, hang past the deadline, return the wrong batch size or NaN, or
die for good; and a real worker process killed with SIGKILL.

What must hold every time: only the requests whose batch met the fault fail (500, or 504 past the
deadline), every other request gets the right answer for ITS image, the server recovers once the
fault is gone, and /health/ready tells the truth:
  - 200 while the backend answers (a batch that fails now and then does not make the server unready);
  - 503 while an inference call has run longer than the request deadline (a hung backend), and while
    the last 3 or more batches in a row failed (a broken backend); 200 again after the next good batch.
/health/live stays 200 throughout: the process is up and answering HTTP.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from server.backends import Backend, create_backend
from server.config import Settings
from tests.reliability import exported_model
from tests.server.conftest import free_port, png_bytes, reference_scores, running_server

SIZE = 64
PNG = {"Content-Type": "image/png"}
SCORE_RTOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported_model(tmp_path_factory, SIZE)


def digest(pixels: np.ndarray) -> str:
    """Identifies one (3, H, W) uint8 image: the server sees exactly these pixels for a model-size PNG."""
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()


@dataclass(frozen=True)
class Sample:
    body: bytes  # PNG at model size (lossless, no resize)
    pixels: np.ndarray  # (3, SIZE, SIZE) uint8
    score: float  # the model's score for it, from model.onnx run directly


def make_images(model_dir: Path, count: int, seed: int = 0) -> list[Sample]:
    """`count` distinct noise images with their reference scores."""
    rng = np.random.default_rng(seed)
    pixels = [rng.integers(0, 256, size=(3, SIZE, SIZE), dtype=np.uint8) for _ in range(count)]
    _, scores = reference_scores(model_dir, pixels)
    return [
        Sample(png_bytes(np.ascontiguousarray(p.transpose(1, 2, 0))), p, float(s))
        for p, s in zip(pixels, scores, strict=True)
    ]


class FaultyBackend:
    """The real ONNX Runtime backend; `fault_for(call)` picks a fault for inference call 1, 2, ...
    (warm-up calls are not counted): None, "raise", "hang", "extra_item", "short_scores",
    "flat_maps", "nan" or "die" (this call and every later one raise until `revive()`)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0
        self.fault_for: Callable[[int], str | None] = lambda call: None
        self.faulted: set[str] = set()  # digests of the images in batches that met a fault
        self.batch_sizes: list[int] = []
        self.release = threading.Event()
        self.hanging = threading.Event()
        self.dead = False

    def revive(self) -> None:
        self.dead = False
        self.fault_for = lambda call: None

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (N,3,H,W) -> (N,1,H,W), (N,)
        self.calls += 1
        self.batch_sizes.append(len(images))
        fault = "die" if self.dead else self.fault_for(self.calls)
        if fault is None:
            return self.inner.infer(images)
        self.faulted.update(digest(image) for image in images)
        if fault == "raise":
            raise RuntimeError(f"injected failure in call {self.calls}")
        if fault == "die":
            self.dead = True
            raise RuntimeError("injected: the device is gone")
        if fault == "hang":
            self.hanging.set()
            self.release.wait(timeout=60)
            self.hanging.clear()
            return self.inner.infer(images)
        maps, scores = self.inner.infer(images)
        if fault == "extra_item":  # one answer too many: a naive server would shift answers
            return np.concatenate([maps[-1:], maps]), np.concatenate([scores[-1:], scores])
        if fault == "short_scores":
            return maps, scores[:-1]
        if fault == "flat_maps":  # (N, H, W) instead of (N, 1, H, W)
            return maps[:, 0], scores
        if fault == "nan":
            return maps, np.full_like(scores, np.nan)
        raise AssertionError(f"unknown fault {fault!r}")

    def warmup(self, batch_sizes: Any) -> None:
        self.inner.warmup(batch_sizes)

    def close(self) -> None:
        self.release.set()
        self.inner.close()


@pytest.fixture
def faulty_server(model_dir: Path) -> Iterator[Callable[..., tuple[str, FaultyBackend]]]:
    """`start(**settings)` -> (base URL, the wrapped backend) of a real server on loopback."""
    from server.app import create_app

    with ExitStack() as stack:

        def start(**overrides: Any) -> tuple[str, FaultyBackend]:
            wrapped: list[FaultyBackend] = []

            def factory(kind: Any, info: Any, settings: Settings) -> Backend:
                wrapped.append(FaultyBackend(create_backend(kind, info, settings)))
                return wrapped[-1]

            options = {"model_dirs": [model_dir], "backend": "onnxruntime-cpu", "intra_op_threads": 1}
            url = stack.enter_context(
                running_server(create_app(Settings(**{**options, **overrides}), backend_factory=factory))
            )
            stack.callback(wrapped[0].release.set)  # never leave the model thread hanging
            return url, wrapped[0]

        yield start


def post_all(
    url: str, images: list[Sample], threads: int, query: str = "heatmap=none"
) -> list[httpx.Response]:
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda image: http.post(f"{url}/predict?{query}", content=image.body,
                                                     headers=PNG), images))  # fmt: skip


def assert_only_faulted_failed(
    responses: list[httpx.Response], images: list[Sample], backend: FaultyBackend, failure: int = 500
) -> int:
    """Each request: `failure` if its image met a fault, else 200 with ITS OWN score. -> failures."""
    failed = 0
    for response, image in zip(responses, images, strict=True):
        if digest(image.pixels) in backend.faulted:
            assert response.status_code == failure, response.text
            assert response.json()["error"] == "inference_failed"
            failed += 1
        else:
            assert response.status_code == 200, response.text
            assert response.json()["score"] == pytest.approx(image.score, rel=SCORE_RTOL)
    return failed


def status(url: str, path: str) -> int:
    return httpx.get(f"{url}{path}", timeout=30).status_code


def wait_for_status(url: str, path: str, expected: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := status(url, path)) != expected:
        assert time.monotonic() < deadline, f"{path} stayed {got}, expected {expected}"
        time.sleep(0.05)


def wait_for_empty_queue(url: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        lengths = [line for line in text.splitlines() if line.startswith("ead_queue_length{")]
        if lengths and all(float(line.rsplit(" ", 1)[1]) == 0 for line in lengths):
            return
        assert time.monotonic() < deadline, f"the queue never emptied: {lengths}"
        time.sleep(0.05)


class ReadinessWatch:
    """Polls /health/ready in a thread; `statuses` is everything it saw."""

    def __init__(self, url: str) -> None:
        self.url, self.statuses, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                self.statuses.append(http.get(f"{self.url}/health/ready").status_code)
                self._stop.wait(0.02)

    def __enter__(self) -> ReadinessWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# ------------------------------------------------------------------------------------------ raises


def test_intermittent_failures_fail_only_their_batch_and_ready_stays_true(
    faulty_server: Callable[..., tuple[str, FaultyBackend]], model_dir: Path
) -> None:
    url, backend = faulty_server(max_batch_size=4, max_batch_delay_ms=20)
    backend.fault_for = lambda call: "raise" if call % 3 == 0 else None  # every third batch fails
    images = make_images(model_dir, 24)
    with ReadinessWatch(url) as watch:
        responses = post_all(url, images, threads=8)
    failed = assert_only_faulted_failed(responses, images, backend)
    assert backend.calls >= 3 and 0 < failed < len(images)
    assert set(watch.statuses) == {200}, "a backend that still answers keeps the server ready"
    assert "injected failure" in next(r for r in responses if r.status_code == 500).json()["detail"]
    backend.revive()
    after = make_images(model_dir, 4, seed=1)
    assert assert_only_faulted_failed(post_all(url, after, threads=4), after, backend) == 0


# ------------------------------------------------------------------------------ wrong output shape


@pytest.mark.parametrize("fault", ["extra_item", "short_scores", "flat_maps"])
def test_a_wrong_output_shape_fails_its_batch_not_the_others(
    faulty_server: Callable[..., tuple[str, FaultyBackend]], model_dir: Path, fault: str
) -> None:
    url, backend = faulty_server(max_batch_size=4, max_batch_delay_ms=50)
    backend.fault_for = lambda call: fault if call == 1 else None
    images = make_images(model_dir, 12, seed=2)
    responses = post_all(url, images, threads=6)
    assert assert_only_faulted_failed(responses, images, backend) >= 1
    detail = next(r for r in responses if r.status_code == 500).json()["detail"]
    assert "backend returned" in detail and "for input" in detail
    assert status(url, "/health/ready") == 200


def test_non_finite_scores_fail_their_batch_with_a_clear_error(
    faulty_server: Callable[..., tuple[str, FaultyBackend]], model_dir: Path
) -> None:
    url, backend = faulty_server(max_batch_size=4, max_batch_delay_ms=50)
    backend.fault_for = lambda call: "nan" if call == 1 else None
    images = make_images(model_dir, 8, seed=3)
    responses = post_all(url, images, threads=4)
    assert assert_only_faulted_failed(responses, images, backend) >= 1
    detail = next(r for r in responses if r.status_code == 500).json()["detail"]
    assert "finite" in detail


# -------------------------------------------------------------------------------------------- hang


def test_a_hung_backend_answers_504_then_recovers(
    faulty_server: Callable[..., tuple[str, FaultyBackend]], model_dir: Path
) -> None:
    url, backend = faulty_server(max_batch_size=1, max_batch_delay_ms=0, request_timeout_ms=500, max_queue=3)
    backend.fault_for = lambda call: "hang" if call == 1 else None
    hung, queued, later = make_images(model_dir, 3, seed=4)
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(max_workers=8) as pool:
        post = lambda image: http.post(f"{url}/predict", content=image.body, headers=PNG)  # noqa: E731
        first = pool.submit(post, hung)
        assert backend.hanging.wait(30)
        second = post(queued)  # waits behind the hung batch past its deadline
        flood = list(pool.map(post, [queued] * 6))  # the queue (3) fills with requests that time out
        assert status(url, "/health/live") == 200
        assert first.result().status_code == 504
        assert first.result().json()["error"] == "deadline_exceeded"
        assert second.status_code == 504
        assert {r.status_code for r in flood} <= {503, 504}
        assert all(r.json()["error"] in ("queue_full", "deadline_exceeded") for r in flood)
        backend.release.set()
        wait_for_status(url, "/health/ready", 200)
        wait_for_empty_queue(url)  # the worker drops the timed-out requests still queued
        answer = post(later)
    assert answer.status_code == 200
    assert answer.json()["score"] == pytest.approx(later.score, rel=SCORE_RTOL)


def test_ready_is_503_while_the_backend_hangs_and_200_after(
    faulty_server: Callable[..., tuple[str, FaultyBackend]], model_dir: Path
) -> None:
    url, backend = faulty_server(max_batch_size=1, max_batch_delay_ms=0, request_timeout_ms=1000)
    backend.fault_for = lambda call: "hang" if call == 1 else None
    (image,) = make_images(model_dir, 1, seed=5)
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(max_workers=1) as pool:
        stuck = pool.submit(http.post, f"{url}/predict", content=image.body, headers=PNG)
        assert backend.hanging.wait(30)
        assert status(url, "/health/ready") == 200  # not yet past the deadline: just busy
        wait_for_status(url, "/health/ready", 503, timeout_s=10)
        body = http.get(f"{url}/health/ready").json()
        assert body["status"] == "not_ready" and "running for" in body["detail"]
        backend.release.set()
        assert stuck.result().status_code == 504
        wait_for_status(url, "/health/ready", 200)


# --------------------------------------------------------------------------------- dies mid-batch


def test_a_backend_that_dies_mid_run_fails_each_request_cleanly(
    faulty_server: Callable[..., tuple[str, FaultyBackend]], model_dir: Path
) -> None:
    url, backend = faulty_server(max_batch_size=2, max_batch_delay_ms=20)
    backend.fault_for = lambda call: "die" if call == 3 else None
    images = make_images(model_dir, 16, seed=6)
    responses = post_all(url, images, threads=4)
    failed = assert_only_faulted_failed(responses, images, backend)
    assert 0 < failed < len(images)
    assert all(digest(i.pixels) in backend.faulted for i, r in zip(images, responses, strict=True)
               if r.status_code == 500)  # fmt: skip
    assert status(url, "/health/live") == 200 and status(url, "/metrics") == 200
    backend.revive()  # e.g. the device came back after a reset
    after = make_images(model_dir, 4, seed=7)
    assert assert_only_faulted_failed(post_all(url, after, threads=2), after, backend) == 0


def test_ready_is_503_after_repeated_failures_and_200_after_a_good_batch(
    faulty_server: Callable[..., tuple[str, FaultyBackend]], model_dir: Path
) -> None:
    url, backend = faulty_server(max_batch_size=1, max_batch_delay_ms=0, request_timeout_ms=3000)
    backend.fault_for = lambda call: "die" if call == 2 else None
    images = make_images(model_dir, 7, seed=8)

    def predict(image: Sample) -> httpx.Response:
        return httpx.post(f"{url}/predict?heatmap=none", content=image.body, headers=PNG, timeout=60)

    statuses = [(predict(image).status_code, status(url, "/health/ready")) for image in images[:5]]
    assert statuses == [(200, 200), (500, 200), (500, 200), (500, 503), (500, 503)]
    assert "failed" in httpx.get(f"{url}/health/ready", timeout=30).json()["detail"]
    # a deadline after the last failure it is tried again (no traffic needed), and fails again at once
    wait_for_status(url, "/health/ready", 200, timeout_s=15)
    assert predict(images[5]).status_code == 500 and status(url, "/health/ready") == 503
    backend.revive()
    answer = predict(images[6])
    assert answer.status_code == 200
    assert answer.json()["score"] == pytest.approx(images[6].score, rel=SCORE_RTOL)
    assert status(url, "/health/ready") == 200


# ------------------------------------------------------------------------ a worker process killed


def test_a_killed_worker_process_is_replaced_and_the_other_keeps_answering(
    model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "efficientad", "serve", str(model_dir), "--port", str(port),
               "--backend", "onnxruntime-cpu", "--workers", "2", "--log-format", "text"]  # fmt: skip
    env = {**os.environ, "EAD_INTRA_OP_THREADS": "1", "EAD_LOG_LEVEL": "WARNING"}
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_ready_process(url, server, log_path)
        workers = child_pids(server.pid)
        assert len(workers) >= 2, workers
        images = make_images(model_dir, 24, seed=10)
        killed = workers[0]
        with httpx.Client(timeout=60) as http, ThreadPoolExecutor(max_workers=4) as pool:

            def post(index_image: tuple[int, Sample]) -> int | str:
                index, image = index_image
                if index == 8:
                    os.kill(killed, signal.SIGKILL)
                try:
                    answer = http.post(f"{url}/predict?heatmap=none", content=image.body, headers=PNG)
                except httpx.TransportError as error:
                    return type(error).__name__
                assert answer.status_code != 200 or answer.json()["score"] == pytest.approx(
                    image.score, rel=SCORE_RTOL
                )
                return answer.status_code

            outcomes = list(pool.map(post, enumerate(images)))
        assert outcomes.count(200) >= len(images) - 4, outcomes  # at most the requests in flight fail
        assert all(o == 200 or isinstance(o, str) for o in outcomes), outcomes
        deadline = time.monotonic() + 120
        while True:  # uvicorn's supervisor starts a new worker in place of the dead one
            alive = [pid for pid in child_pids(server.pid) if pid != killed]
            if len(alive) >= 2:
                break
            assert time.monotonic() < deadline, "no replacement worker started"
            time.sleep(0.2)
        wait_for_ready_process(url, server, log_path)
        after = make_images(model_dir, 8, seed=11)
        assert [r.status_code for r in post_all(url, after, threads=4)] == [200] * 8
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def child_pids(parent: int) -> list[int]:
    """Live (not zombie) child processes of `parent`, from /proc (Linux)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        state, ppid = fields[0], int(fields[1])
        if ppid == parent and state != "Z":
            children.append(int(stat.parent.name))
    return sorted(children)


def wait_for_ready_process(
    url: str, server: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 180
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"server exited: {log_path.read_text(errors='replace')[-2000:]}"
        try:
            if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server never became ready")
