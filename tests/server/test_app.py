"""The HTTP API end to end: a real uvicorn server on loopback (ONNX Runtime on the CPU, small exported
random-init models), called over HTTP with httpx."""

from __future__ import annotations

import base64
import io
import json
import logging
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from server.backends import Backend, create_backend
from server.config import Settings
from server.logs import JsonFormatter
from tests.server.conftest import (
    COOKIE,
    TEST_THRESHOLD,
    jpeg_bytes,
    metric,
    model_input,
    noise_png,
    png_bytes,
    random_image,
    reference_scores,
    running_server,
)

JPEG = {"Content-Type": "image/jpeg"}
PNG = {"Content-Type": "image/png"}
SCORE_RTOL = 1e-5  # batched vs single-image float32 sums differ in the last bits


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def small_settings(model_dir: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {"model_dirs": [model_dir], "backend": "onnxruntime-cpu", "intra_op_threads": 1}
    return Settings(**{**options, **overrides})


# ------------------------------------------------------------------------------------ real cookie images


def test_cookie_images_score_like_the_graph_run_directly(
    cookie_model_dir: Path, client: httpx.Client
) -> None:
    from server.app import create_app

    paths = [COOKIE / name for name in ("test/good/test-normal-1.jpg", "test/anomaly/anomaly-10.jpg",
                                        "test/anomaly/anomaly-11.jpg")]  # fmt: skip
    bodies = [path.read_bytes() for path in paths]
    _, expected = reference_scores(cookie_model_dir, [model_input(body, 256) for body in bodies])
    settings = small_settings(cookie_model_dir, max_batch_size=3, max_batch_delay_ms=20)
    with running_server(create_app(settings)) as url:
        for body, path, score in list(zip(bodies, paths, expected, strict=True))[:2]:
            response = client.post(f"{url}/predict", content=body, headers={"Content-Type": "image/jpeg"})
            assert response.status_code == 200, response.text
            result = response.json()
            assert result["score"] == pytest.approx(float(score), rel=SCORE_RTOL)
            assert result["model"] == "cookie256" and len(result["model_version"]) == 12
            assert result["threshold"] == TEST_THRESHOLD
            assert result["is_anomaly"] == (result["score"] > TEST_THRESHOLD)
            assert result["image_size"] == list(Image.open(path).size)
            assert result["heatmap_size"] == [256, 256]
            assert decode_png(base64.b64decode(result["heatmap_png"])).size == (256, 256)
            assert set(result["timings_ms"]) == {"read", "decode", "queue", "inference", "encode", "total"}
            assert result["timings_ms"]["total"] >= result["timings_ms"]["inference"] > 0

        query = "heatmap_size=original&heatmap_style=overlay"
        original = client.post(f"{url}/predict?{query}", content=bodies[1], headers=JPEG).json()
        width, height = Image.open(paths[1]).size
        assert original["heatmap_size"] == [width, height]
        heatmap = decode_png(base64.b64decode(original["heatmap_png"]))
        assert heatmap.size == (width, height) and heatmap.mode == "RGB"

        as_png = client.post(f"{url}/predict", content=bodies[2],
                             headers={"Content-Type": "image/jpeg", "Accept": "image/png"})  # fmt: skip
        assert as_png.status_code == 200 and as_png.headers["content-type"] == "image/png"
        assert decode_png(as_png.content).size == (256, 256)
        assert float(as_png.headers["X-Anomaly-Score"]) == pytest.approx(float(expected[2]), rel=SCORE_RTOL)
        assert as_png.headers["X-Is-Anomaly"] == ("true" if expected[2] > TEST_THRESHOLD else "false")
        assert float(as_png.headers["X-Threshold"]) == TEST_THRESHOLD

        files = [("file", (path.name, body, "image/jpeg")) for path, body in zip(paths, bodies, strict=True)]
        several = client.post(f"{url}/predict", files=files)
        assert several.status_code == 200, several.text
        document = several.json()
        assert document["model"] == "cookie256"
        assert [item["filename"] for item in document["results"]] == [path.name for path in paths]
        got = [item["score"] for item in document["results"]]
        np.testing.assert_allclose(got, expected, rtol=SCORE_RTOL)


# ----------------------------------------------------------------------------------- batching under load


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
    small_model_dir: Path, client: httpx.Client
) -> None:
    from server.app import create_app

    images = [noise_png(seed) for seed in range(32)]
    _, expected = reference_scores(small_model_dir, [pixels for _, pixels in images])
    gaps = np.diff(np.sort(expected))
    assert gaps.min() > 4 * SCORE_RTOL * expected.max()  # distinct scores: a mix-up could not pass
    settings = small_settings(small_model_dir, max_batch_size=8, max_batch_delay_ms=50)
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    with running_server(create_app(settings)) as url, httpx.Client(timeout=120, limits=limits) as pool_client:

        def post(body: bytes) -> httpx.Response:
            return pool_client.post(
                f"{url}/predict?heatmap=none", content=body, headers={"Content-Type": "image/png"}
            )

        with ThreadPoolExecutor(max_workers=32) as threads:
            responses = list(threads.map(post, [body for body, _ in images]))
        assert [response.status_code for response in responses] == [200] * 32
        scores = [response.json()["score"] for response in responses]
        np.testing.assert_allclose(scores, expected, rtol=SCORE_RTOL)
        batches = metric(url, "ead_batch_size_count")
        assert metric(url, "ead_batch_size_sum") == 32
        assert 1 <= batches < 32
        assert metric(url, "ead_images_total", {"model": "small"}) == 32
        assert metric(url, "ead_requests_total", {"route": "/predict", "status": "200"}) == 32
        assert metric(url, "ead_queue_seconds_count") == 32
        assert metric(url, "ead_request_seconds_count") >= 32
        assert max(response.json()["timings_ms"]["queue"] for response in responses) > 0


# ---------------------------------------------------------------------------------------- bad inputs


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data (a 'decompression bomb')."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def strict_server(small_model_dir: Path) -> Iterator[str]:
    from server.app import create_app

    settings = small_settings(small_model_dir, max_body_bytes=200_000, max_batch_size=4, max_batch_delay_ms=1)
    with running_server(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def good_request(small_model_dir: Path) -> tuple[bytes, float]:
    body, pixels = noise_png(3)
    _, expected = reference_scores(small_model_dir, [pixels])
    return body, float(expected[0])


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="GIF")
    return buffer.getvalue()


COOKIE_JPEG = (COOKIE / "train/good/normal-1.jpg").read_bytes()


def _large_jpeg() -> bytes:
    return jpeg_bytes(random_image(7, (400, 400)), quality=100)  # random noise: > 200 kB


def _chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), 16_384):
        yield data[start : start + 16_384]


TEXT_ONLY_FORM = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--b--\r\n'
FORM_TYPE = "multipart/form-data; boundary=b"
TOO_BIG = b"\xff" * 250_000
BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str, str]] = [
    # (id, httpx keyword arguments, status, error code, words in detail)
    ("empty body", {"content": b"", "headers": JPEG}, 400, "empty_body", "no image data"),
    ("truncated jpeg", {"content": COOKIE_JPEG[: len(COOKIE_JPEG) // 2], "headers": JPEG},
     400, "undecodable_image", "truncated"),
    ("text as jpeg", {"content": b"hello, this is not an image\n" * 20, "headers": JPEG},
     400, "undecodable_image", "image/jpeg"),
    ("1x1 image", {"content": png_bytes(np.zeros((1, 1, 3), np.uint8)), "headers": PNG},
     400, "image_too_small", "1x1"),
    ("30000x30000 image", {"content": png_header_only(30000, 30000), "headers": PNG},
     413, "image_too_large", "too large"),
    ("body over the limit", {"content": TOO_BIG, "headers": JPEG}, 413, "body_too_large", "limit is 200000"),
    ("chunked body over the limit", {"content": _chunks(TOO_BIG), "headers": JPEG},
     413, "body_too_large", "limit of 200000"),
    ("text/plain", {"content": b"abc", "headers": {"Content-Type": "text/plain"}},
     415, "unsupported_media_type", "text/plain"),
    ("json", {"content": b"{}", "headers": {"Content-Type": "application/json"}},
     415, "unsupported_media_type", "application/json"),
    ("no content type, a GIF", {"content": gif_bytes()}, 415, "unsupported_media_type", "GIF"),
    ("heatmap=foo", {"params": {"heatmap": "foo"}}, 422, "invalid_parameter", "heatmap"),
    ("heatmap_style=rainbow", {"params": {"heatmap_style": "rainbow"}}, 422, "invalid_parameter", "style"),
    ("heatmap_size=huge", {"params": {"heatmap_size": "huge"}}, 422, "invalid_parameter", "heatmap_size"),
    ("threshold=abc", {"params": {"threshold": "abc"}}, 422, "invalid_parameter", "threshold"),
    ("threshold=nan", {"params": {"threshold": "nan"}}, 422, "invalid_parameter", "finite"),
    ("unknown parameter", {"params": {"heatmapp": "png"}}, 422, "invalid_parameter", "'heatmapp'"),
    ("unknown model", {"params": {"model": "nope"}}, 404, "unknown_model", "'nope'"),
    ("png + heatmap=none", {"params": {"heatmap": "none"}, "headers": {"Accept": "image/png"}},
     422, "invalid_parameter", "Accept"),
    ("multipart, no boundary", {"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}},
     400, "bad_multipart", "boundary"),
    ("multipart with no files", {"content": TEXT_ONLY_FORM, "headers": {"Content-Type": FORM_TYPE}},
     400, "empty_body", "no file"),
    ("multipart with an empty file", {"files": [("a", ("empty.png", b"", "image/png"))]},
     400, "empty_body", "empty.png"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "request_args", "status", "code", "words"), BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])  # fmt: skip
def test_bad_requests_get_a_clear_error_and_the_server_stays_healthy(
    strict_server: str,
    good_request: tuple[bytes, float],
    case: str,
    request_args: dict[str, Any],
    status: int,
    code: str,
    words: str,
) -> None:
    body, expected = good_request
    arguments = dict(request_args)
    if "content" not in arguments and "files" not in arguments:
        arguments |= {
            "content": body,
            "headers": {"Content-Type": "image/png", **arguments.get("headers", {})},
        }
    with httpx.Client(timeout=60) as http:
        response = http.post(f"{strict_server}/predict", **arguments)
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()
        assert error["error"] == code
        assert words in error["detail"], error["detail"]
        good = http.post(f"{strict_server}/predict", content=body, headers={"Content-Type": "image/png"})
    assert good.status_code == 200
    assert good.json()["score"] == pytest.approx(expected, rel=SCORE_RTOL)


def test_a_bad_file_in_a_multipart_request_is_named(
    strict_server: str, good_request: tuple[bytes, float]
) -> None:
    body, _ = good_request
    files = [("a", ("ok.png", body, "image/png")), ("b", ("broken.jpg", b"not a jpeg at all", "image/jpeg"))]
    response = httpx.post(f"{strict_server}/predict", files=files, timeout=60)
    assert response.status_code == 400
    assert response.json()["detail"].startswith("broken.jpg: ")


def test_heatmap_styles_and_no_heatmap(strict_server: str, good_request: tuple[bytes, float]) -> None:
    body, expected = good_request
    headers = {"Content-Type": "image/png"}
    with httpx.Client(base_url=strict_server, timeout=60) as http:
        for style, mode in (("gray", "L"), ("jet", "P"), ("overlay", "RGB")):
            result = http.post(f"/predict?heatmap_style={style}", content=body, headers=headers).json()
            assert decode_png(base64.b64decode(result["heatmap_png"])).mode == mode
            assert result["score"] == pytest.approx(expected, rel=SCORE_RTOL)
        no_map = http.post("/predict?heatmap=none", content=body, headers=headers).json()
        assert no_map["heatmap_png"] is None and no_map["heatmap_size"] is None
        overridden = http.post("/predict?threshold=0", content=body, headers=headers).json()
        assert overridden["threshold"] == 0 and overridden["is_anomaly"] is True


def test_unknown_routes_and_methods_answer_json(strict_server: str) -> None:
    missing = httpx.get(f"{strict_server}/nope", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    wrong_method = httpx.get(f"{strict_server}/predict", timeout=30)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"] == "method_not_allowed"


def test_health_model_info_and_docs(strict_server: str, small_model_dir: Path) -> None:
    with httpx.Client(base_url=strict_server, timeout=30) as http:
        assert http.get("/health/live").json() == {"status": "alive"}
        assert http.get("/health/ready").json() == {"status": "ready", "models": ["small"]}
        info = http.get("/v1/model").json()
        version = json.loads((small_model_dir / "model.json").read_text())["onnx"]["sha256"][:12]
        assert info == {
            "name": "small", "version": version, "input_size": [64, 64], "model_size": "small",
            "threshold": TEST_THRESHOLD, "backend": "onnxruntime-cpu", "max_batch_size": 4,
            "max_batch_delay_ms": 1.0, "default": True,
        }  # fmt: skip
        assert http.get("/v1/models").json() == {"default": "small", "models": [info]}
        docs = http.get("/docs")
        assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
        paths = http.get("/openapi.json").json()["paths"]
        assert {"/predict", "/v1/models/{name}/predict", "/health/ready", "/metrics", "/v1/model"} <= set(
            paths
        )
        assert "image/jpeg" in paths["/predict"]["post"]["requestBody"]["content"]
        assert http.get("/metrics").headers["content-type"].startswith("text/plain")


# ------------------------------------------------------------------------------------ API key and logs


def test_api_key_is_required_and_never_logged(
    small_model_dir: Path, good_request: tuple[bytes, float], caplog: pytest.LogCaptureFixture
) -> None:
    from server.app import create_app

    key = "k3y-that-must-not-leak"
    body, expected = good_request
    image_headers = {"Content-Type": "image/png"}
    settings = small_settings(small_model_dir, api_key=key, max_batch_size=2)
    with (
        caplog.at_level(logging.DEBUG),
        running_server(create_app(settings)) as url,
        httpx.Client(timeout=60) as http,
    ):
        missing = http.post(f"{url}/predict", content=body, headers=image_headers)
        assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
        assert "X-API-Key" in missing.json()["detail"] and missing.headers["WWW-Authenticate"] == "Bearer"
        bad_query = http.post(f"{url}/predict?heatmap=foo", content=body, headers=image_headers)
        assert bad_query.status_code == 401  # the key is checked before anything else
        wrong = http.post(f"{url}/predict", content=body, headers={**image_headers, "X-API-Key": key + "x"})
        assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong API key"
        wrong_bearer = http.post(
            f"{url}/predict", content=body, headers={**image_headers, "Authorization": "Bearer no"}
        )
        assert wrong_bearer.status_code == 401
        with_header = http.post(f"{url}/predict", content=body, headers={**image_headers, "X-API-Key": key})
        with_bearer = http.post(f"{url}/predict", content=body,
                                headers={**image_headers, "Authorization": f"Bearer {key}"})  # fmt: skip
        for response in (with_header, with_bearer):
            assert response.status_code == 200
            assert response.json()["score"] == pytest.approx(expected, rel=SCORE_RTOL)
        assert http.get(f"{url}/health/ready").status_code == 200  # probes need no key
        assert http.get(f"{url}/metrics").status_code == 200
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert not [line for line in lines if key in line]
    access = [entry for line in lines if (entry := json.loads(line))["logger"] == "efficientad.access"]
    predicts = [entry for entry in access if entry["route"] == "/predict"]
    assert [entry["status"] for entry in predicts] == [401, 401, 401, 401, 200, 200]
    assert all(entry["model"] == "small" and entry["ms"] > 0 for entry in predicts[4:])


# ------------------------------------------------------------------------- failures, queue, deadlines


class GatedFailingBackend:
    """A real ONNX Runtime backend, wrapped: raises for an all-black image, and can be held in infer()."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.gate.is_set():
            self.entered.set()
            self.gate.wait(timeout=60)
        if np.any(images.reshape(len(images), -1).max(axis=1) == 0):
            raise RuntimeError("all-black test image")
        return self.inner.infer(images)

    def warmup(self, batch_sizes: Any) -> None:
        self.inner.warmup(batch_sizes)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def gated_server(small_model_dir: Path) -> Iterator[Callable[..., tuple[str, GatedFailingBackend]]]:
    from contextlib import ExitStack

    from server.app import create_app

    with ExitStack() as stack:

        def start(**overrides: Any) -> tuple[str, GatedFailingBackend]:
            wrappers: list[GatedFailingBackend] = []

            def factory(kind: Any, info: Any, settings: Settings) -> Backend:
                wrappers.append(GatedFailingBackend(create_backend(kind, info, settings)))
                return wrappers[-1]

            app = create_app(small_settings(small_model_dir, **overrides), backend_factory=factory)
            url = stack.enter_context(running_server(app))
            stack.callback(lambda: [wrapper.gate.set() for wrapper in wrappers])  # never leave a thread held
            return url, wrappers[0]

        yield start


BLACK_PNG = png_bytes(np.zeros((64, 64, 3), np.uint8))


def test_an_inference_error_fails_only_its_own_batch(
    gated_server: Callable[..., tuple[str, GatedFailingBackend]], good_request: tuple[bytes, float]
) -> None:
    body, expected = good_request
    url, _ = gated_server(max_batch_size=2, max_batch_delay_ms=2000)
    headers = {"Content-Type": "image/png"}
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(max_workers=2) as threads:
        first = list(threads.map(lambda data: http.post(f"{url}/predict", content=data, headers=headers),
                                 [BLACK_PNG, body]))  # fmt: skip  # one batch of two
        second = list(threads.map(lambda data: http.post(f"{url}/predict", content=data, headers=headers),
                                  [body, body]))  # fmt: skip  # the next batch
    assert [response.status_code for response in first] == [500, 500]
    assert first[0].json()["error"] == "inference_failed" and "all-black" in first[0].json()["detail"]
    assert [response.status_code for response in second] == [200, 200]
    assert [response.json()["score"] for response in second] == pytest.approx([expected] * 2, rel=SCORE_RTOL)
    assert metric(url, "ead_batch_size_count") == 1  # only the successful batch is recorded


def test_full_queue_answers_503_with_retry_after(
    gated_server: Callable[..., tuple[str, GatedFailingBackend]], good_request: tuple[bytes, float]
) -> None:
    body, expected = good_request
    url, backend = gated_server(max_batch_size=1, max_batch_delay_ms=0, max_queue=2)
    headers = {"Content-Type": "image/png"}
    backend.hold()
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(max_workers=3) as threads:
        post = lambda: http.post(f"{url}/predict?heatmap=none", content=body, headers=headers)  # noqa: E731
        running = threads.submit(post)
        assert backend.entered.wait(30)  # request 1 is inside inference
        queued = [threads.submit(post) for _ in range(2)]
        deadline = time.monotonic() + 30
        while metric(url, "ead_queue_length", {"model": "small"}) < 2:
            assert time.monotonic() < deadline, "requests never queued"
            time.sleep(0.02)
        refused = post()
        backend.gate.set()
        answered = [future.result() for future in (running, *queued)]
    assert refused.status_code == 503
    assert refused.json()["error"] == "queue_full" and refused.headers["Retry-After"] == "1"
    assert [response.status_code for response in answered] == [200, 200, 200]
    assert [response.json()["score"] for response in answered] == pytest.approx(
        [expected] * 3, rel=SCORE_RTOL
    )


def test_a_passed_deadline_answers_504_and_later_requests_still_work(
    gated_server: Callable[..., tuple[str, GatedFailingBackend]], good_request: tuple[bytes, float]
) -> None:
    body, expected = good_request
    url, backend = gated_server(max_batch_size=1, max_batch_delay_ms=0, request_timeout_ms=400)
    headers = {"Content-Type": "image/png"}
    backend.hold()
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(max_workers=2) as threads:
        in_inference = threads.submit(lambda: http.post(f"{url}/predict", content=body, headers=headers))
        assert backend.entered.wait(30)
        in_queue = http.post(f"{url}/predict", content=body, headers=headers)  # waits behind the held batch
        held = in_inference.result()
        backend.gate.set()
        for response in (held, in_queue):
            assert response.status_code == 504
            assert response.json()["error"] == "deadline_exceeded" and "400 ms" in response.json()["detail"]
        time.sleep(0.1)
        after = http.post(f"{url}/predict", content=body, headers=headers)
    assert after.status_code == 200 and after.json()["score"] == pytest.approx(expected, rel=SCORE_RTOL)


# ----------------------------------------------------------------------------------------- two models


def test_two_models_each_with_its_own_batcher(
    small_model_dir: Path, second_model_dir: Path, client: httpx.Client
) -> None:
    from server.app import create_app

    body, pixels = noise_png(5)
    _, small_expected = reference_scores(small_model_dir, [pixels])
    _, other_expected = reference_scores(second_model_dir, [pixels])
    assert abs(small_expected[0] - other_expected[0]) > 100 * SCORE_RTOL * abs(small_expected[0])
    settings = small_settings(small_model_dir, model_dirs=[small_model_dir, f"other={second_model_dir}"])
    headers = {"Content-Type": "image/png"}
    with running_server(create_app(settings)) as url:
        models = client.get(f"{url}/v1/models").json()
        assert models["default"] == "small"
        assert [model["name"] for model in models["models"]] == ["small", "other"]
        by_default = client.post(f"{url}/predict", content=body, headers=headers).json()
        by_query = client.post(f"{url}/predict?model=other", content=body, headers=headers).json()
        by_path = client.post(f"{url}/v1/models/other/predict", content=body, headers=headers).json()
        assert by_default["model"] == "small" and by_query["model"] == by_path["model"] == "other"
        assert by_default["score"] == pytest.approx(float(small_expected[0]), rel=SCORE_RTOL)
        assert (
            by_query["score"] == by_path["score"] == pytest.approx(float(other_expected[0]), rel=SCORE_RTOL)
        )
        unknown = client.post(f"{url}/v1/models/nope/predict", content=body, headers=headers)
        assert unknown.status_code == 404 and "small, other" in unknown.json()["detail"]
        clash = client.post(f"{url}/v1/models/other/predict?model=small", content=body, headers=headers)
        assert clash.status_code == 422
        assert metric(url, "ead_queue_length", {"model": "other"}) == 0
        assert metric(url, "ead_images_total", {"model": "other"}) == 2


# ------------------------------------------------------------------------------------ start and readiness


def test_a_model_failing_to_load_stops_startup_and_closes_the_loaded_ones(
    small_model_dir: Path, second_model_dir: Path
) -> None:
    import asyncio

    from server.backends import BackendError
    from server.state import ServingState

    closed: list[str] = []

    class ClosingRecorder(GatedFailingBackend):
        def __init__(self, inner: Backend, model_name: str) -> None:
            super().__init__(inner)
            self.model_name = model_name

        def close(self) -> None:
            closed.append(self.model_name)
            super().close()

    def factory(kind: Any, info: Any, settings: Settings) -> Backend:
        if info.name == "other":
            raise BackendError("other: no such device")
        return ClosingRecorder(create_backend(kind, info, settings), info.name)

    settings = small_settings(small_model_dir, model_dirs=[small_model_dir, f"other={second_model_dir}"])
    state = ServingState(settings, factory)
    with pytest.raises(BackendError, match="no such device"):
        asyncio.run(state.start())
    assert closed == ["small"]
    assert state.models == {} and not state.ready


def test_not_ready_answers_503_on_ready_and_predict(
    small_model_dir: Path, good_request: tuple[bytes, float]
) -> None:
    from server.app import create_app

    body, expected = good_request
    app = create_app(small_settings(small_model_dir, retry_after_s=3))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        state = app.state.serving
        state.ready, state.status_detail = False, "shutting down"  # as during shutdown
        ready = http.get("/health/ready")
        assert ready.status_code == 503 and ready.headers["Retry-After"] == "3"
        assert ready.json() == {"status": "not_ready", "models": [], "detail": "shutting down"}
        refused = http.post("/predict", content=body, headers=PNG)
        assert refused.status_code == 503 and refused.json()["error"] == "not_ready"
        assert "shutting down" in refused.json()["detail"] and refused.headers["Retry-After"] == "3"
        assert http.get("/health/live").status_code == 200
        state.ready = True
        again = http.post("/predict", content=body, headers=PNG)
        assert again.status_code == 200 and again.json()["score"] == pytest.approx(expected, rel=SCORE_RTOL)
