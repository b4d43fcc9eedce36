"""Fixtures for the deployment tests: the repository root and a small exported model dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docker.helpers import REPO

MODEL_SIZE_PX = 64


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def exported_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model dir exported from a random-init checkpoint at 64 px (threshold 0.1): real graph, fast."""
    from tests.server.conftest import export_random_model

    root = tmp_path_factory.mktemp("deploy-model")
    return export_random_model(root / "models", MODEL_SIZE_PX, name="cookie")
