"""What a production line needs beyond a score: defect regions in every answer, score and verdict metrics,
and reloading a model (a new threshold, a new graph) under load without a failed request.

Real server (uvicorn on loopback, ONNX Runtime on the CPU, a 64 px model exported from a random-weight
checkpoint), real cookie photos, over HTTP.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from server.config import Settings
from server.regions import find_regions
from tests.server.conftest import COOKIE, metric, running_server

JPEG = {"Content-Type": "image/jpeg"}
DEFECT = COOKIE / "test" / "anomaly" / "anomaly-10.jpg"
GOOD = COOKIE / "test" / "good" / "test-normal-10.jpg"

# ----------------------------------------------------------------------------------------- regions


def blobs() -> np.ndarray:
    """(64, 96) map: a strong blob top-left, a weaker one bottom-right, one hot pixel, noise below 0.1."""
    anomaly_map = np.full((64, 96), 0.05, dtype=np.float32)
    anomaly_map[4:12, 8:24] = 0.5  # 8 x 16 = 128 pixels
    anomaly_map[40:60, 70:90] = 0.3  # 20 x 20 = 400 pixels
    anomaly_map[30, 40] = 0.2
    return anomaly_map


def test_regions_are_the_components_above_the_threshold_in_image_pixels() -> None:
    regions = find_regions(blobs(), 0.1, image_size=(192, 128))  # the image is twice the map's size
    assert [region["max_score"] for region in regions] == pytest.approx([0.5, 0.3, 0.2])  # largest first
    strong, weak, single = regions
    assert strong["area"] == 128 * 4 and weak["area"] == 400 * 4 and single["area"] == 4
    for region, (rows, columns) in (
        (strong, (slice(4, 12), slice(8, 24))),
        (weak, (slice(40, 60), slice(70, 90))),
    ):
        # boxes follow 4x4 map cells: they cover the blob, at most 3 map pixels (6 image pixels) wider
        assert region["x"] <= 2 * columns.start and region["x"] + region["width"] >= 2 * columns.stop
        assert region["y"] <= 2 * rows.start and region["y"] + region["height"] >= 2 * rows.stop
        assert region["width"] <= 2 * (columns.stop - columns.start) + 12
        assert region["height"] <= 2 * (rows.stop - rows.start) + 12
    for region in regions:
        assert region["x"] >= 0 and region["x"] + region["width"] <= 192
        assert region["y"] >= 0 and region["y"] + region["height"] <= 128


def test_regions_limits_and_no_threshold() -> None:
    anomaly_map = blobs()
    assert len(find_regions(anomaly_map, 0.1, image_size=(96, 64), max_regions=2)) == 2
    kept = find_regions(anomaly_map, 0.1, image_size=(96, 64), min_area=200)
    assert [region["area"] for region in kept] == [400]
    assert find_regions(anomaly_map, None, image_size=(96, 64)) == []
    assert find_regions(anomaly_map, 0.9, image_size=(96, 64)) == []
    everything = find_regions(anomaly_map, 0.0, image_size=(96, 64))
    assert everything == [{"x": 0, "y": 0, "width": 96, "height": 64, "area": 96 * 64, "max_score": 0.5}]
    anomaly_map[0, 0] = np.nan  # a NaN is never above a threshold
    assert find_regions(anomaly_map, 0.0, image_size=(96, 64))[0]["area"] == 96 * 64 - 1


# -------------------------------------------------------------------------------- a served model


@pytest.fixture
def model_copy(small_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the 64 px model dir, free to be changed and reloaded."""
    return Path(shutil.copytree(small_model_dir, tmp_path / "line"))


@pytest.fixture
def served(model_copy: Path) -> Iterator[str]:
    from server.app import create_app

    settings = Settings(model_dirs=[model_copy], backend="onnxruntime-cpu", intra_op_threads=1)
    with running_server(create_app(settings)) as url:
        yield url


def predict(url: str, path: Path = DEFECT, query: str = "heatmap=none", **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/predict?{query}", content=path.read_bytes(), headers={**JPEG, **headers}, timeout=60
    )


def test_a_defective_cookie_at_threshold_zero_has_regions_inside_the_image(served: str) -> None:
    answer = predict(served, query="threshold=0&heatmap=none").json()
    width, height = answer["image_size"]
    assert answer["regions"], answer
    assert len(answer["regions"]) <= 16
    for region in answer["regions"]:
        assert set(region) == {"x", "y", "width", "height", "area", "max_score"}
        assert 0 <= region["x"] < region["x"] + region["width"] <= width
        assert 0 <= region["y"] < region["y"] + region["height"] <= height
        assert 0 < region["area"] <= region["width"] * region["height"]
        assert region["max_score"] <= answer["score"] + 1e-6
    assert answer["regions"][0]["max_score"] == pytest.approx(answer["score"], rel=1e-5)
    scores = [region["max_score"] for region in answer["regions"]]
    assert scores == sorted(scores, reverse=True)

    above_all = predict(served, query=f"threshold={answer['score'] * 2}&heatmap=none").json()
    assert above_all["regions"] == []
    with_heatmap = predict(served, query="threshold=0").json()  # computed beside the PNG: the same
    assert with_heatmap["regions"] == answer["regions"]
    as_png = predict(served, query="threshold=0", Accept="image/png")
    assert as_png.headers["content-type"] == "image/png"
    assert int(as_png.headers["X-Regions"]) == len(answer["regions"])


def test_metrics_count_verdicts_and_scores(served: str) -> None:
    answers = [predict(served, path).json() for path in (DEFECT, GOOD, DEFECT)]
    answers.append(predict(served, query="threshold=1e9&heatmap=none").json())  # an override: ok
    text = httpx.get(f"{served}/metrics").text
    assert "ead_anomaly_score_bucket" in text and "ead_predictions_total" in text
    anomalies = sum(answer["is_anomaly"] for answer in answers)
    line = {"model": "line"}
    assert metric(served, "ead_predictions_total", {**line, "verdict": "anomaly"}) == anomalies
    assert metric(served, "ead_predictions_total", {**line, "verdict": "ok"}) == len(answers) - anomalies
    assert metric(served, "ead_anomaly_score_count", line) == len(answers)
    assert metric(served, "ead_anomaly_score_sum", line) == pytest.approx(
        sum(answer["score"] for answer in answers), rel=1e-6
    )
    threshold = answers[0]["threshold"]
    at_threshold = metric(served, "ead_anomaly_score_bucket", {**line, "le": repr(float(f"{threshold:.6g}"))})
    assert at_threshold == sum(answer["score"] <= threshold for answer in answers)


# ------------------------------------------------------------------------------------------ reload


def write_threshold(model_dir: Path, threshold: float) -> None:
    document = json.loads((model_dir / "model.json").read_text())
    document["threshold"] = threshold
    (model_dir / "model.json").write_text(json.dumps(document))


def test_reload_serves_a_new_threshold_and_keeps_the_version(served: str, model_copy: Path) -> None:
    before = httpx.get(f"{served}/v1/model").json()
    write_threshold(model_copy, 0.123)
    assert httpx.get(f"{served}/v1/model").json()["threshold"] == before["threshold"]  # not until reloaded
    answer = httpx.post(f"{served}/v1/models/line/reload", timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["threshold"] == 0.123 and body["previous_threshold"] == before["threshold"]
    assert body["version"] == body["previous_version"] == before["version"]  # same graph
    after = httpx.get(f"{served}/v1/model").json()
    assert after["threshold"] == 0.123 and after["version"] == before["version"]
    assert predict(served).json()["threshold"] == 0.123


def test_a_broken_dir_leaves_the_old_model_serving(served: str, model_copy: Path) -> None:
    before = predict(served).json()
    onnx = model_copy / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])  # truncated: its hash no longer matches model.json
    answer = httpx.post(f"{served}/v1/models/line/reload", timeout=120)
    assert answer.status_code == 422
    assert answer.json()["error"] == "reload_failed" and "model.onnx" in answer.json()["detail"]
    still = predict(served).json()
    assert still["score"] == before["score"] and still["model_version"] == before["model_version"]
    assert httpx.get(f"{served}/health/ready").status_code == 200
    missing = httpx.post(f"{served}/v1/models/nonesuch/reload", timeout=30)
    assert missing.status_code == 404


def test_32_concurrent_predictions_around_a_reload_all_succeed(served: str, model_copy: Path) -> None:
    write_threshold(model_copy, 0.2)
    body = DEFECT.read_bytes()
    start = threading.Barrier(33)
    results: list[Any] = []

    def one(_: int) -> int:
        with httpx.Client(timeout=120) as client:
            start.wait()
            return client.post(f"{served}/predict?heatmap=none", content=body, headers=JPEG).status_code

    with ThreadPoolExecutor(max_workers=33) as pool:
        futures = [pool.submit(one, index) for index in range(32)]
        start.wait()
        reload = httpx.post(f"{served}/v1/models/line/reload", timeout=120)
        results = [future.result() for future in futures]
    assert reload.status_code == 200, reload.text
    assert results == [200] * 32
    assert httpx.get(f"{served}/health/ready").status_code == 200
    assert predict(served).json()["threshold"] == 0.2


def test_reload_needs_the_api_key(model_copy: Path) -> None:
    from server.app import create_app

    settings = Settings(
        model_dirs=[model_copy], backend="onnxruntime-cpu", intra_op_threads=1, api_key="line-secret"
    )
    with running_server(create_app(settings)) as url:
        assert httpx.post(f"{url}/v1/models/line/reload", timeout=60).status_code == 401
        keyed = httpx.post(f"{url}/v1/models/line/reload", headers={"X-API-Key": "line-secret"}, timeout=120)
        assert keyed.status_code == 200


def test_sighup_reloads_every_model_of_the_real_command(tmp_path: Path) -> None:
    """`efficientad serve` as deployed (its own process, uvicorn's signal handling): SIGHUP reloads."""
    import os
    import signal
    import time

    from benchmarks.null_model import make_null_model
    from benchmarks.server_process import ServerProcess

    model_dir = make_null_model(tmp_path / "null")
    with ServerProcess(
        model_dir, log_path=tmp_path / "server.log", env={"EAD_INTRA_OP_THREADS": "1"}
    ) as server:
        before = httpx.get(f"{server.url}/v1/model").json()
        write_threshold(model_dir, 0.0625)
        os.kill(server._process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/v1/model").json()["threshold"] != 0.0625:
            assert time.monotonic() < deadline, "SIGHUP did not reload the model"
            time.sleep(0.2)
        after = httpx.get(f"{server.url}/v1/model").json()
        assert after["version"] == before["version"]
        assert httpx.get(f"{server.url}/health/ready").status_code == 200
    assert server._process.returncode == 0  # and it still shuts down cleanly
