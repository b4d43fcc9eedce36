"""Evaluation: metrics of a saved run on the real cookie test set, and the per-defect bookkeeping."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from efficientad.cli import main
from training.data import EvaluationData
from training.evaluate import evaluate, format_table, metrics_from_maps
from training.images import DataError


def test_evaluate_reloaded_checkpoint_reproduces_the_training_metrics(
    tiny_run: Path, cookie_dir: Path
) -> None:
    result = evaluate(tiny_run, cookie_dir, device="cpu")
    document = json.loads((tiny_run / "checkpoint.json").read_text())
    recorded = document["metrics"]
    for name in ("image_auroc", "pixel_auroc", "au_pro"):
        assert result["overall"][name] == pytest.approx(recorded["overall"][name], abs=1e-9)
        assert result["per_defect"]["anomaly"][name] == pytest.approx(recorded["overall"][name], abs=1e-9)
    assert result["overall"]["images"] == 10 and result["images_per_second"] > 0
    assert len(result["scores"]) == 10 and "test/anomaly/test-anomaly-1.jpg" in result["scores"]
    assert result["threshold"] == document["threshold"]
    assert 0.0 <= result["threshold_accuracy"] <= 1.0
    assert len(result["checkpoint_sha256"]) == 64
    table = format_table(result)
    assert "overall" in table and "anomaly" in table and "images/s" in table


def test_evaluate_cli_prints_a_table_and_writes_json(
    tiny_run: Path, cookie_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "reports" / "eval.json"
    assert main(["evaluate", str(tiny_run), str(cookie_dir), "--json", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "image AUROC" in printed and "overall" in printed
    written = json.loads(out.read_text())
    assert set(written["overall"]) >= {"image_auroc", "pixel_auroc", "au_pro", "images"}


def test_evaluate_without_a_test_folder_is_a_data_error(tiny_run: Path, cookie_copy: Path) -> None:
    shutil.rmtree(cookie_copy / "test")
    shutil.rmtree(cookie_copy / "ground_truth")
    with pytest.raises(DataError, match="no test images") as error:
        evaluate(tiny_run, cookie_copy, device="cpu")
    assert str(cookie_copy / "test") in str(error.value)


def _synthetic_test_set() -> EvaluationData:
    """2 good images, 2 'crack' with masks, 1 'hole' with a mask and 1 'hole' without one; 8x8."""
    masks = np.zeros((6, 8, 8), dtype=bool)
    masks[2, 1:3, 1:3] = True
    masks[3, 4:7, 4:7] = True
    masks[4, 0:2, 5:8] = True
    return EvaluationData(
        images=torch.zeros(6, 3, 8, 8, dtype=torch.uint8),
        labels=np.array([False, False, True, True, True, True]),
        masks=masks,
        has_mask=np.array([True, True, True, True, True, False]),
        defects=["good", "good", "crack", "crack", "hole", "hole"],
        names=[f"test/x/{i}.png" for i in range(6)],
    )


def test_perfect_maps_score_one_and_unmasked_anomalies_do_not_count_for_pixels() -> None:
    test_set = _synthetic_test_set()
    maps = test_set.masks.astype(np.float32)
    maps[5] = 5.0  # the anomaly without a mask: a "wrong" map that must not reach the pixel metrics
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.7, 0.6])
    result = metrics_from_maps(test_set, maps, scores)
    for name in ("image_auroc", "pixel_auroc", "au_pro"):
        assert result["overall"][name] == pytest.approx(1.0)
    assert set(result["per_defect"]) == {"crack", "hole"}
    assert result["per_defect"]["crack"]["images"] == 4  # 2 good + 2 crack
    assert result["per_defect"]["hole"]["images_with_masks"] == 1
    assert result["overall"]["images_with_masks"] == 3


def test_per_defect_metrics_are_separate() -> None:
    test_set = _synthetic_test_set()
    maps = test_set.masks.astype(np.float32)
    maps[4] = 1.0 - maps[4]  # the hole map is inverted: its pixel metrics fail, the crack's do not
    scores = np.array([0.5, 0.6, 0.9, 0.8, 0.1, 0.2])  # holes score below the good images
    result = metrics_from_maps(test_set, maps, scores)
    assert result["per_defect"]["crack"]["image_auroc"] == pytest.approx(1.0)
    assert result["per_defect"]["crack"]["pixel_auroc"] == pytest.approx(1.0)
    assert result["per_defect"]["hole"]["image_auroc"] == pytest.approx(0.0)
    assert result["per_defect"]["hole"]["pixel_auroc"] < 0.5
    assert 0.0 < result["overall"]["image_auroc"] < 1.0


def test_metrics_are_none_when_a_subset_cannot_define_them() -> None:
    test_set = _synthetic_test_set()
    only_good = EvaluationData(
        images=test_set.images[:2],
        labels=test_set.labels[:2],
        masks=test_set.masks[:2],
        has_mask=test_set.has_mask[:2],
        defects=test_set.defects[:2],
        names=test_set.names[:2],
    )
    result = metrics_from_maps(only_good, only_good.masks.astype(np.float32), np.array([0.1, 0.2]))
    assert result["overall"]["image_auroc"] is None and result["overall"]["au_pro"] is None
    assert result["per_defect"] == {}
