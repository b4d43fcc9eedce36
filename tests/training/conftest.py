"""Shared fixtures for the training tests: the bundled real images and one small trained run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from efficientad.cli import main

ROOT = Path(__file__).resolve().parents[2]
COOKIE = ROOT / "samples" / "cookie"
NATURAL = ROOT / "samples" / "natural"
TINY_IMAGE_SIZE = 64  # smallest input the autoencoder takes; keeps every run fast on 2 CPU cores


def tiny_train_args(data_dir: Path, out: Path, *extra: str, steps: int = 3) -> list[str]:
    """`efficientad train` arguments for a few steps at 64 px against a random teacher on the CPU (the paper's
    recipe with these flags on top, so the tests do not follow the fast recipe's tuning)."""
    return [
        "train",
        str(data_dir),
        "--out",
        str(out),
        "--image-size",
        str(TINY_IMAGE_SIZE),
        "--steps",
        str(steps),
        "--teacher",
        "random",
        "--penalty-dir",
        str(NATURAL),
        "--device",
        "cpu",
        "--recipe",
        "paper",
        *extra,
    ]


@pytest.fixture(scope="session")
def cookie_dir() -> Path:
    return COOKIE


@pytest.fixture(scope="session")
def natural_dir() -> Path:
    return NATURAL


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for 3 steps on samples/cookie through the real CLI; shared read-only by several tests."""
    run_dir = tmp_path_factory.mktemp("runs") / "cookie"
    assert main(tiny_train_args(COOKIE, run_dir)) == 0
    return run_dir


@pytest.fixture
def cookie_copy(tmp_path: Path) -> Path:
    """A writable copy of samples/cookie, for tests that break the layout."""
    target = tmp_path / "cookie"
    shutil.copytree(COOKIE, target)
    return target
