"""Reliability tests: fault injection, fuzzing, security checks and a short soak, all against the real
server (ONNX Runtime on the CPU, small random-init models exported through the real exporter).

`exported_model(tmp_path_factory, size)` exports one model per size per test session and shares it
between the test modules here (pytest fixtures cannot be shared across modules without a conftest).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

FUZZ_REGRESSIONS = Path(__file__).parent / "fuzz_regressions"
_EXPORT_LOCK = threading.Lock()


def exported_model(tmp_path_factory: pytest.TempPathFactory, size: int = 64) -> Path:
    """A random-weight PDN-small model at `size` px (model.onnx + model.json), made once per session."""
    from tests.server.conftest import export_random_model

    root = tmp_path_factory.getbasetemp() / "reliability-models"
    model_dir = root / f"model{size}"
    with _EXPORT_LOCK:
        if not (model_dir / "model.json").is_file():
            root.mkdir(parents=True, exist_ok=True)
            export_random_model(root, size, name=f"model{size}")
    return model_dir
