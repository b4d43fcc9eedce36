"""`efficientad serve` as a real process: JSON logs, SIGTERM drains in-flight requests and exits 0; bad
arguments are one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from efficientad.cli import build_parser, main
from tests.server.conftest import free_port, metric, noise_png, reference_scores

STARTUP_TIMEOUT_S = 180


def wait_until_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()}")


def test_sigterm_finishes_in_flight_requests_then_exits_0(small_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    command = [
        sys.executable, "-m", "efficientad.cli", "serve", str(small_model_dir), "--port", str(port),
        "--backend", "onnxruntime-cpu", "--max-batch-size", "8", "--max-batch-delay-ms", "1500",
        "--log-format", "json",
    ]  # fmt: skip
    environment = {**os.environ, "EAD_INTRA_OP_THREADS": "1"}
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
    try:
        wait_until_ready(url, process, log)
        images = [noise_png(seed) for seed in range(4)]
        _, expected = reference_scores(small_model_dir, [pixels for _, pixels in images])
        with httpx.Client(timeout=60) as http, ThreadPoolExecutor(max_workers=4) as threads:
            futures = [
                threads.submit(
                    http.post, f"{url}/predict", content=body, headers={"Content-Type": "image/png"}
                )
                for body, _ in images
            ]
            deadline = time.monotonic() + 30
            while metric(url, "ead_queue_length", {"model": "small"}) < 4:  # all four wait for their batch
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            responses = [future.result() for future in futures]
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert [response.status_code for response in responses] == [200] * 4
    scores = [response.json()["score"] for response in responses]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert {response.json()["timings_ms"]["queue"] > 100 for response in responses} == {
        True
    }  # they had waited

    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    access = [
        record
        for record in records
        if record["logger"] == "efficientad.access" and record["route"] == "/predict"
    ]
    assert len(access) == 4
    assert all(
        record["status"] == 200 and record["model"] == "small" and record["ms"] > 0 for record in access
    )
    messages = [record["message"] for record in records]
    assert any("all models closed" in message for message in messages)


def test_serve_and_predict_are_registered() -> None:
    parser = build_parser()
    serve = parser.parse_args(["serve", "a", "b=c", "--backend", "onnxruntime-cpu", "--max-batch-size", "4"])
    assert (
        serve.model_dirs == ["a", "b=c"] and serve.backend == "onnxruntime-cpu" and serve.max_batch_size == 4
    )
    predict = parser.parse_args(["predict", "x.jpg", "--url", "http://h:1"])
    assert predict.url == "http://h:1" and callable(predict.handler)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["/no/such/model"], "model directory not found: /no/such/model"),
        (["{empty}"], "model.json is missing"),
        (["{model}", "--max-batch-size", "0"], "max_batch_size"),
        (["{model}", "--backend", "onnxruntime-cuda"], "--backend onnxruntime-cuda cannot run here"),
    ],
)
def test_serve_argument_errors_are_one_line(
    arguments: list[str],
    message: str,
    small_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    filled = [argument.format(empty=tmp_path, model=small_model_dir) for argument in arguments]
    assert main(["serve", *filled]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error
