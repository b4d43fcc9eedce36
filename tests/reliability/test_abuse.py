"""Abuse survived: `efficientad serve` (the real CLI, uvicorn, a real ONNX graph) against clients that
flood it with connections, stop sending mid-body, or vanish mid-upload.

- beyond `max_connections` new requests get a fast 503 (uvicorn's limit_concurrency), never a stall;
- a body that has not arrived within `body_timeout_s` is answered 408 and its connection closed;
- a client that disconnects mid-upload is an INFO line, never an ERROR or a traceback;
- and through all of it the server keeps answering everyone else.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.null_model import make_null_model
from benchmarks.server_process import ServerProcess

REPO = Path(__file__).resolve().parents[2]
COOKIE = REPO / "samples" / "cookie" / "test" / "anomaly" / "anomaly-10.jpg"
MAX_CONNECTIONS = 8
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("abuse")
    model_dir = make_null_model(work / "null-model")
    process = ServerProcess(
        model_dir,
        log_path=work / "server.log",
        log_level="INFO",
        env={
            "EAD_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
            "EAD_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "EAD_INTRA_OP_THREADS": "1",
            "EAD_LOG_FORMAT": "json",
        },
    )
    with process:
        yield process


def address(server: ServerProcess) -> tuple[str, int]:
    return "127.0.0.1", server.port


def predict_ok(server: ServerProcess) -> None:
    response = httpx.post(
        f"{server.url}/predict?heatmap=none",
        content=COOKIE.read_bytes(),
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
        trust_env=False,
    )
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["score"], float)


def head_of(connection: socket.socket, limit_s: float) -> bytes:
    """Everything the server sends until it closes or `limit_s` passes."""
    connection.settimeout(limit_s)
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except TimeoutError:
        pass
    return received


def partial_upload(server: ServerProcess, sent: int = 100, declared: int = 50_000) -> socket.socket:
    connection = socket.create_connection(address(server))
    head = (
        f"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    connection.sendall(head + COOKIE.read_bytes()[:sent])
    return connection


def log_records(server: ServerProcess) -> list[dict]:
    records = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append({"level": "RAW", "message": line})
    return records


def test_a_flood_beyond_the_cap_gets_fast_503s(server: ServerProcess) -> None:
    idle = [socket.create_connection(address(server)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # the server has accepted them all
        started = time.perf_counter()
        refused = httpx.get(f"{server.url}/health/live", timeout=5, trust_env=False)
        elapsed = time.perf_counter() - started
        assert refused.status_code == 503
        assert elapsed < 1.0
    finally:
        for connection in idle:
            connection.close()
    time.sleep(0.3)
    predict_ok(server)


def test_a_body_that_stops_arriving_is_cut_off(server: ServerProcess) -> None:
    connection = partial_upload(server)
    try:
        started = time.perf_counter()
        answer = head_of(connection, limit_s=BODY_TIMEOUT_S + 10)
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"body_timeout"' in answer
    assert BODY_TIMEOUT_S * 0.8 < elapsed < BODY_TIMEOUT_S + 5  # and head_of saw the connection close
    predict_ok(server)


def test_a_client_that_disconnects_mid_upload_is_an_info_line(server: ServerProcess) -> None:
    before = len(log_records(server))
    partial_upload(server).close()
    time.sleep(0.5)
    predict_ok(server)
    records = log_records(server)[before:]
    assert any("disconnected during the upload" in record.get("message", "") for record in records), records
    disconnect = next(r for r in records if "disconnected during the upload" in r.get("message", ""))
    assert disconnect["level"] == "INFO"
    serious = [r for r in records if r.get("level") in ("ERROR", "CRITICAL", "RAW")]
    assert serious == [], serious
    assert not any("Traceback" in json.dumps(record) for record in records)
