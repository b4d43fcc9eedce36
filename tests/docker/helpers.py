"""Shared helpers for the deployment tests."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# EAD_* variables that docker/entrypoint reads itself (the rest are server settings).
ENTRYPOINT_VARIABLES = frozenset({"EAD_MODELS_ROOT", "EAD_ENGINE_BUILD", "EAD_HEALTHCHECK_HOST"})


def venv_bin() -> Path:
    """The folder of the running interpreter's console scripts (.venv/bin)."""
    return Path(sys.executable).parent


def tool(name: str) -> str | None:
    """A console tool from this venv, else from PATH."""
    candidate = venv_bin() / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
