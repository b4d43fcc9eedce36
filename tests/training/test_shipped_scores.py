"""No change to the model code moves a score: the shipped cookie model, evaluated through `EfficientAD`,
gives the scores recorded for every test photo when it shipped (data/shipped_cookie_scores.json; the
recording before it, for the previous model, checked the one-module refactor against commit ae05815)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint
from training.data import load_test_set, scan_category
from training.evaluate import evaluate_model
from training.model import EfficientAD

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = ROOT / "samples" / "models" / "cookie"
RECORDED = Path(__file__).parent / "data" / "shipped_cookie_scores.json"
SHARED_COOKIE = ROOT.parent / "shared" / "data" / "cookie"


@pytest.fixture(scope="module")
def recorded() -> dict:
    document = json.loads(RECORDED.read_text())
    if load_checkpoint(SHIPPED_MODEL).sha256 != document["checkpoint_tensors_sha256"]:
        pytest.skip("the shipped cookie model changed since these scores were recorded")
    return document


def test_the_shipped_model_scores_every_cookie_photo_as_before(recorded: dict) -> None:
    data_dir = SHARED_COOKIE if SHARED_COOKIE.is_dir() else ROOT / "samples" / "cookie"
    checkpoint = load_checkpoint(SHIPPED_MODEL)
    test_set = load_test_set(scan_category(data_dir), checkpoint.config.image_size)
    result = evaluate_model(EfficientAD.from_checkpoint(checkpoint), test_set, torch.device("cpu"))
    assert len(result["scores"]) == (54 if data_dir == SHARED_COOKIE else 10)
    for name, score in result["scores"].items():
        assert score == recorded["scores"][name], name  # identical, not close
    if data_dir == SHARED_COOKIE:
        for metric, value in recorded["overall"].items():
            assert result["overall"][metric] == value, metric
