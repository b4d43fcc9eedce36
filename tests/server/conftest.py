"""Shared fixtures for the server tests: small real model dirs (random-init checkpoints exported through
`export.exporter.export_model`, built once per session) and a real uvicorn server on loopback."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
COOKIE = REPO / "samples" / "cookie"
COOKIE_IMAGES = sorted((COOKIE / "train" / "good").glob("*.jpg")) + sorted((COOKIE / "test").glob("*/*.jpg"))
SMALL_SIZE = 64  # px: the fast model for most tests
TEST_THRESHOLD = 0.1


def export_random_model(
    root: Path,
    image_size: int,
    *,
    name: str,
    seed: int = 0,
    threshold: float = TEST_THRESHOLD,
    parity_images: list[Path] | None = None,
) -> Path:
    """A random-weight checkpoint (as in contracts.md) exported to `root/name` (model.onnx + model.json)."""
    import torch

    from export.exporter import export_model
    from training.checkpoint import ModelConfig, save_checkpoint
    from training.model import MapStatistics
    from training.networks import build_networks

    torch.manual_seed(seed)
    teacher, student, autoencoder = build_networks("small", image_size)
    run_dir = root / f"run-{name}"
    save_checkpoint(
        run_dir,
        config=ModelConfig(size="small", image_size=image_size),
        teacher=teacher,
        student=student,
        autoencoder=autoencoder,
        stats=MapStatistics.identity(),
        metadata={"threshold": threshold, "teacher": {"source": "random", "random": True}},
    )
    export_model(run_dir, root / name, parity_images=parity_images or COOKIE_IMAGES[:2])
    return root / name


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_random_model(tmp_path_factory.mktemp("models"), SMALL_SIZE, name="small")


@pytest.fixture(scope="session")
def second_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another 64 px model with other weights (for serving two models at once)."""
    return export_random_model(tmp_path_factory.mktemp("models2"), SMALL_SIZE, name="other", seed=1)


@pytest.fixture(scope="session")
def cookie_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256 px model: the real input size, for the cookie-image parity test."""
    return export_random_model(tmp_path_factory.mktemp("models256"), 256, name="cookie256")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(app: Any, *, startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Run `app` with uvicorn (httptools, asyncio) on a loopback port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http="httptools", lifespan="on", access_log=False, log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during startup (see the log above)")
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start in time")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def jpeg_bytes(pixels: np.ndarray, quality: int = 95) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def random_image(seed: int, size: tuple[int, int] = (96, 80)) -> np.ndarray:
    """(H, W, 3) uint8 noise; `size` is (width, height)."""
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def metric(base_url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample's value from GET /metrics (0 when absent)."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return 0.0


def noise_png(seed: int) -> tuple[bytes, np.ndarray]:
    """A 64x64 PNG (lossless, model size: no resize) and its (3, 64, 64) pixels (brighter with seed)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(40 + 5 * seed, 10 + 2 * seed, (64, 64, 3)), 0, 255).astype(np.uint8)
    return png_bytes(pixels), pixels.transpose(2, 0, 1).copy()


def reference_scores(model_dir: Path, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """model.onnx run directly by onnxruntime on (3, H, W) uint8 images -> (maps (N,1,H,W), scores (N,))."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    maps, scores = session.run(["anomaly_map", "score"], {"image": np.stack(images)})
    return maps, scores


def model_input(data: bytes, size: int) -> np.ndarray:
    """Decode + resize the way the model sees it, with plain Pillow: (3, size, size) uint8."""
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as http:
        yield http
