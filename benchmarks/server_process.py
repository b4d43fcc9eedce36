"""The real server (`efficientad serve`) as a subprocess on a free loopback port, for the HTTP benchmark."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

LOG_TAIL_CHARS = 3000


class ServerStartError(RuntimeError):
    """The server process exited or never became ready; the message carries the end of its log."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET without any proxy from the environment (the server is on loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class ServerProcess:
    """`with ServerProcess(model_dir, ...) as server:` starts `efficientad serve`, waits for
    /health/ready, and on exit sends SIGTERM (the server drains) and waits for it to stop."""

    def __init__(
        self,
        model_dir: Path,
        *,
        log_path: Path,
        backend: str = "onnxruntime-cpu",
        max_batch_size: int = 16,
        max_batch_delay_ms: float = 2.0,
        request_timeout_ms: float | None = None,
        workers: int = 1,
        log_level: str = "WARNING",
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 300.0,
    ):
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path)
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_batch_delay_ms = max_batch_delay_ms
        self.request_timeout_ms = request_timeout_ms
        self.workers = workers
        self.log_level = log_level
        self.env = dict(env or {})
        self.ready_timeout_s = ready_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def command(self) -> list[str]:
        timeout = (
            [] if self.request_timeout_ms is None else ["--request-timeout-ms", str(self.request_timeout_ms)]
        )
        return [
            sys.executable, "-m", "efficientad", "--log-level", self.log_level, "serve", str(self.model_dir),
            "--host", "127.0.0.1", "--port", str(self.port), "--backend", self.backend,
            "--max-batch-size", str(self.max_batch_size),
            "--max-batch-delay-ms", str(self.max_batch_delay_ms), "--workers", str(self.workers), *timeout,
        ]  # fmt: skip

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # closed in __exit__
        env = {**os.environ, "EAD_LOG_LEVEL": self.log_level, **self.env}
        logger.info("starting server: %s", " ".join(self.command()))
        self._process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerStartError(
                    f"the server exited with code {self._process.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self._log_tail()}"
                )
            try:
                status, _ = _get(f"{self.url}/health/ready", timeout=2.0)
            except OSError:
                status = 0
            if status == 200:
                logger.info("server ready at %s", self.url)
                return
            time.sleep(0.2)
        raise ServerStartError(
            f"the server was not ready within {self.ready_timeout_s:.0f} s; "
            f"log {self.log_path}:\n{self._log_tail()}"
        )

    def model_info(self) -> dict[str, Any]:
        """GET /v1/model: the default model's name, version, backend, max batch size, ..."""
        status, body = _get(f"{self.url}/v1/model")
        if status != 200:
            raise RuntimeError(f"GET {self.url}/v1/model answered {status}: {body[:200]!r}")
        return dict(json.loads(body))

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                logger.warning("server did not stop within 60 s of SIGTERM; killing it")
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()


class FloorAppProcess(ServerProcess):
    """`with FloorAppProcess(model_dir, ...) as floor:` the minimal app (benchmarks.floor_app) on the same
    model, started, probed and stopped as the server is; the server's own settings do not apply to it."""

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "benchmarks.floor_app", str(self.model_dir), "--host", "127.0.0.1",
            "--port", str(self.port),
        ]  # fmt: skip
