"""Training speed: the real distill / backbone / train steps timed on the CPU at a tiny size, their rows in
the report's JSON and in its Markdown table, and the CLI flags that set them."""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import training_speed
from benchmarks.report import TRAINING_HEADER, build_report, markdown_report, validate_report
from benchmarks.training_speed import TrainingSpeed, precisions_for, time_steps, time_training
from training.device import resolve_precision

BATCH = 2


@pytest.fixture(scope="module")
def section() -> TrainingSpeed:
    """One tiny run for the module: 64 px images, 48 px distill and penalty crops, batch 2, 1 warm-up + 2
    timed steps."""
    return time_training(
        "cpu",
        train_sizes=[64],
        train_penalty_crops=[(64, 48)],
        train_batch=BATCH,
        distill_cases=[(64, 48)],
        distill_batch=BATCH,
        backbone=True,
        backbone_batch=1,
        warmup=1,
        steps=2,
    )


def _report(training: dict[str, Any] | None) -> dict[str, Any]:
    return build_report(
        device={"kind": "cpu", "name": "Test CPU (2 cores)", "cpu": "Test CPU", "cpu_count": 2},
        host={"hostname": "h"},
        versions={"torch": torch.__version__},
        model={"dir": "/m", "size": "small", "input_height": 64, "input_width": 64, "weights": "random"},
        settings={},
        backends=[],
        stages=[],
        http=[],
        server_backend=None,
        notes=[],
        training_speed=training,
        created=datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    )


def test_distill_backbone_and_train_rows_have_positive_consistent_times(section: TrainingSpeed) -> None:
    native = resolve_precision("auto", torch.device("cpu")) == "bf16"
    precisions = ["fp32", "bf16"] if native else ["fp32"]
    assert [(row.stage, row.crop, row.precision) for row in section.rows] == [
        (stage, crop, precision)
        for stage, crop in (("distill", 48), ("backbone", None), ("train", None), ("train", 48))
        for precision in precisions
    ], section.notes
    for row in section.rows:
        assert row.device == section.device and "cores" in row.device
        assert row.image_size == 64 and row.steps == 2 and row.warmup == 1 and row.notes
        assert math.isfinite(row.median_s) and row.median_s > 0
        assert math.isfinite(row.p90_s) and row.p90_s >= row.median_s
        assert row.steps_per_s == pytest.approx(1.0 / row.median_s)
        assert row.images_per_s == pytest.approx(row.batch_size / row.median_s)
        assert row.gflop_per_step > 0 and row.gflop_per_s == pytest.approx(row.gflop_per_step / row.median_s)
    fp32 = [row for row in section.rows if row.precision == "fp32"]
    by_stage = {row.stage: row for row in fp32 if row.stage != "train" or row.crop is None}
    assert by_stage["distill"].batch_size == BATCH
    assert by_stage["train"].crop is None and by_stage["train"].batch_size == BATCH
    assert by_stage["backbone"].batch_size == 1
    smaller_penalty = next(row for row in section.rows if row.stage == "train" and row.crop == 48)
    assert smaller_penalty.gflop_per_step < by_stage["train"].gflop_per_step  # less work per step
    assert "cache" in by_stage["distill"].notes and "random" in " ".join(section.notes)
    bf16_notes = [note for note in section.notes if note.startswith("bf16 skipped")]
    assert bool(bf16_notes) is not native


def test_report_carries_the_rows_and_renders_the_training_table(section: TrainingSpeed) -> None:
    report = _report(section.as_dict())
    assert validate_report(report) == []
    assert report["training_speed"]["rows"][0]["stage"] == "distill"
    lines = markdown_report(report).splitlines()
    heading = lines.index(f"### Training speed ({section.device}; seconds per optimiser step)")
    assert lines[heading + 2] == "| " + " | ".join(TRAINING_HEADER) + " |"
    assert TRAINING_HEADER == [
        "stage", "precision", "image", "crop", "batch", "median s/step", "p90 s/step", "steps/s", "images/s",
        "GFLOP/step", "GFLOP/s",
    ]  # fmt: skip
    table = []
    for line in lines[heading + 2 :]:
        if not line.startswith("|"):
            break
        table.append(line)
    assert len(table) == 2 + len(section.rows)
    assert {line.count("|") for line in table} == {len(TRAINING_HEADER) + 1}
    assert table[2].startswith(f"| distill | fp32 | 64 | 48 | {BATCH} | ")
    assert any(line.startswith(f"| train | fp32 | 64 | - | {BATCH} | ") for line in table)
    assert any(line.startswith("| backbone | fp32 | 64 | - | 1 | ") for line in table)
    assert any(line.startswith("- distill: PDN step only") for line in lines)


def test_validation_names_a_bad_training_row(section: TrainingSpeed) -> None:
    training = section.as_dict()
    training["rows"][0]["median_s"] = "slow"
    del training["rows"][-1]["stage"]
    problems = validate_report(_report(training))
    assert any(problem.startswith("training_speed.rows[0].median_s: expected") for problem in problems)
    assert f"training_speed.rows[{len(training['rows']) - 1}].stage: missing" in problems


def test_a_report_without_training_has_an_empty_section_and_no_table() -> None:
    report = _report(None)
    assert report["training_speed"] == {"device": "Test CPU (2 cores)", "rows": [], "notes": []}
    assert validate_report(report) == []
    assert "Training speed" not in markdown_report(report)
    del report["training_speed"]  # reports written before the section existed still validate
    assert validate_report(report) == []


def test_bf16_is_timed_only_where_native(monkeypatch: pytest.MonkeyPatch) -> None:
    import training.device

    monkeypatch.setattr(training.device, "resolve_precision", lambda name, device: "bf16")
    assert precisions_for(torch.device("cpu")) == (["fp32", "bf16"], None)
    monkeypatch.setattr(training.device, "resolve_precision", lambda name, device: "fp32")
    precisions, why = precisions_for(torch.device("cpu"))
    assert precisions == ["fp32"] and why is not None and "AVX512-BF16" in why


def test_time_steps_warms_up_untimed_and_stops_at_the_budget() -> None:
    calls: list[float] = []

    def step() -> None:
        calls.append(time.perf_counter())
        time.sleep(0.002)

    seconds = time_steps(step, torch.device("cpu"), warmup=2, steps=3)
    assert len(calls) == 5 and len(seconds) == 3 and all(value >= 0.002 for value in seconds)
    calls.clear()
    seconds = time_steps(step, torch.device("cpu"), warmup=0, steps=50, budget_s=0.0)
    assert len(seconds) == training_speed.MIN_TIMED_STEPS == len(calls)


def test_cli_flags_reach_the_bench_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import benchmarks.run
    from efficientad.cli import main

    seen: list[benchmarks.run.BenchSettings] = []

    def fake_run_bench(settings: benchmarks.run.BenchSettings) -> tuple[dict[str, Any], dict[str, Path]]:
        seen.append(settings)
        return _report(None), {}

    monkeypatch.setattr(benchmarks.run, "run_bench", fake_run_bench)
    argv = ["bench", "--out", str(tmp_path), "--no-cache"]
    assert main([*argv, "--training-sizes", "256,64", "--training-steps", "3"]) == 0
    assert seen[-1].training and seen[-1].training_sizes == [64, 256] and seen[-1].training_steps == 3
    assert seen[-1].training_warmup == 2 and seen[-1].training_distill == [(256, None), (256, 128), (128, 96)]
    assert main([*argv, "--no-training"]) == 0
    assert not seen[-1].training and seen[-1].training_steps == 5
    assert main([*argv, "--training-sizes", "48"]) == 2  # the autoencoder needs multiples of 32, >= 64
    assert "--training-sizes" in capsys.readouterr().err
