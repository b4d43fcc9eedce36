"""What the numbers were measured on: device name, host, library versions."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import math
import os
import platform
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cuda_device_name() -> str | None:
    """The CUDA GPU torch sees (None without torch or without a GPU)."""
    try:
        import torch
    except ModuleNotFoundError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def describe_device(use_gpu: bool) -> dict[str, Any]:
    """`{"kind": "cuda"|"cpu", "name": ..., "cpu": ..., "cpu_count": ...}` for the report's `device` field."""
    gpu = cuda_device_name() if use_gpu else None
    cpu = cpu_name()
    cores = os.cpu_count() or 1
    return {
        "kind": "cuda" if gpu else "cpu",
        "name": gpu or f"{cpu} ({cores} cores)",
        "cpu": cpu,
        "cpu_count": cores,
    }


def device_slug(name: str) -> str:
    """A file-name-safe form of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")
    return slug or "device"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on the machine skews CPU timings)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def effective_cores(threads: int | None = None, unit_s: float = 0.15) -> float:
    """How many cores this process really gets now: `threads` equal CPU-bound units (SHA-256 of a buffer,
    which releases the GIL) run at once, against one unit alone. A virtual machine whose host throttles it,
    or other busy processes, show up as less than `threads`."""
    threads = threads or os.cpu_count() or 1
    block = bytes(1 << 20)

    def unit(blocks: int) -> None:
        digest = hashlib.sha256()
        for _ in range(blocks):
            digest.update(block)

    start = time.perf_counter()
    unit(8)
    blocks = max(8, int(8 * unit_s / max(time.perf_counter() - start, 1e-6)))
    alone = math.inf
    for _ in range(2):
        start = time.perf_counter()
        unit(blocks)
        alone = min(alone, time.perf_counter() - start)
    workers = [threading.Thread(target=unit, args=(blocks,)) for _ in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    together = time.perf_counter() - start
    return round(threads * alone / together, 2)


def describe_host(
    load_at_start: list[float] | None = None, cores_at_start: float | None = None
) -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count() or 1,
        "load_average_start": load_at_start,
        "load_average_end": load_average(),
        "effective_cores_start": cores_at_start,
        "effective_cores_end": effective_cores(),
    }


def package_version(name: str) -> str | None:
    """An installed distribution's version, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    """Versions of everything that can change a timing: torch (+ CUDA, cuDNN), onnxruntime, TensorRT, ..."""
    versions: dict[str, str | None] = {
        "efficientad": package_version("efficientad"),
        "python": platform.python_version(),
        "numpy": package_version("numpy"),
        "pillow": package_version("pillow"),
        "onnx": package_version("onnx"),
        "onnxruntime": None,
        "torch": None,
        "cuda": None,
        "cudnn": None,
        "tensorrt": None,
        "fastapi": package_version("fastapi"),
        "uvicorn": package_version("uvicorn"),
        "httpx": package_version("httpx"),
    }
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ModuleNotFoundError:
        pass
    try:
        import torch

        versions["torch"] = torch.__version__
        versions["cuda"] = torch.version.cuda
        if torch.backends.cudnn.is_available():
            versions["cudnn"] = str(torch.backends.cudnn.version())
    except ModuleNotFoundError:
        pass
    try:
        tensorrt = importlib.import_module("tensorrt")
        versions["tensorrt"] = str(tensorrt.__version__)
    except (ModuleNotFoundError, ImportError, OSError):
        pass
    return versions
