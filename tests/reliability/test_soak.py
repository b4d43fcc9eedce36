"""A short soak (about a minute) of the real `efficientad serve` process: capacity, then an open-loop load
at half of it with the cookie photos; no request may fail and the server's memory must stay in bounds.
Marked slow: deselect with `-m "not slow"`. The long run is `make soak` (docs/reliability.md, "Soak").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.soak import MemorySample, SoakSettings, memory_growth, run_soak, summarise_intervals
from tests.reliability import exported_model


def test_memory_growth_bound_and_slope() -> None:
    mib = 1024 * 1024
    flat = [MemorySample(float(t), 200 * mib, 10, 20) for t in range(60)]
    ok = memory_growth(flat, warmup_s=20, final_window_s=10, duration_s=60, growth_percent=10, growth_mb=20)
    assert ok["within_bound"] and ok["baseline_mb"] == 200 and ok["bound_mb"] == 240
    assert ok["slope_mb_per_min"] == 0
    leak = [MemorySample(float(t), (200 + 2 * t) * mib, 10, 20) for t in range(60)]  # 2 MB/s
    bad = memory_growth(leak, warmup_s=20, final_window_s=10, duration_s=60, growth_percent=10, growth_mb=20)
    assert not bad["within_bound"] and bad["slope_mb_per_min"] == pytest.approx(120)


def test_judge_fails_on_errors_growth_and_unclean_exit() -> None:
    from benchmarks.soak import judge

    clean = {"baseline_mb": 100.0, "final_mb": 101.0, "bound_mb": 130.0, "within_bound": True}
    assert judge({"errors": {}, "requests": 10}, clean, 0) == []
    grown = {**clean, "final_mb": 150.0, "within_bound": False, "bound_rule": "rule"}
    failures = judge({"errors": {"504": 2}, "requests": 10}, grown, -9)
    assert len(failures) == 3 and "2 of 10" in failures[0] and "150.0" in failures[1] and "-9" in failures[2]


def test_intervals_bucket_requests_by_scheduled_time() -> None:
    from benchmarks.soak import Outcome

    outcomes = [Outcome(t * 0.5, 10.0 + t, None if t != 3 else "500") for t in range(20)]  # 0 .. 9.5 s
    rows = summarise_intervals(outcomes, [], duration_s=10, interval_s=5, warmup_s=5)
    assert [row.requests for row in rows] == [10, 10]
    assert rows[0].warmup and not rows[1].warmup
    assert rows[0].errors == {"500": 1} and rows[0].ok == 9 and rows[1].errors == {}


@pytest.mark.slow
def test_short_soak_holds_the_load_without_errors_or_leaks(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    model_dir = exported_model(tmp_path_factory, 64)
    settings = SoakSettings(duration_s=40, fraction=0.5, interval_s=10, warmup_s=10, capacity_s=5)
    report, json_path, md_path = run_soak(settings, model_dir=model_dir, out_dir=tmp_path, work_dir=tmp_path)
    assert report["passed"], report["failures"]
    assert json.loads(json_path.read_text())["load"] == report["load"]
    assert "PASSED" in md_path.read_text().splitlines()[0]
    load, memory = report["load"], report["memory"]
    assert load["errors"] == {} and load["requests"] == load["ok"] > 0
    assert load["requests"] == int(settings.duration_s * load["rate_rps"])  # open loop: every send went out
    assert len(report["intervals"]) == 4 and report["intervals"][0]["warmup"]
    assert all(row["rss_mb"] and row["p99_ms"] for row in report["intervals"])
    assert memory["within_bound"] and memory["final_mb"] <= memory["bound_mb"]
    assert report["server"]["exit_code"] == 0 and report["server"]["log_error_lines"] == 0
