"""The report: schema validation, Markdown rows, derived numbers, the three files."""

from __future__ import annotations

import copy
import datetime
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.report import (
    SCHEMA_VERSION,
    build_report,
    derive,
    markdown_report,
    validate_report,
    write_report,
)


def _backend(name: str, batch: int, p50: float, *, transfer: bool | None = None) -> dict[str, Any]:
    return {
        "name": name, "precision": "fp32", "device": "cpu", "batch_size": batch, "p50_ms": p50,
        "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.2, "mean_ms": p50, "images_per_s": batch * 1000 / p50,
        "includes_transfer": transfer, "timer": "perf_counter", "iterations": 3, "repeats": 1, "notes": "",
    }  # fmt: skip


def _http(concurrency: int, p50: float, throughput: float, mean_batch: float) -> dict[str, Any]:
    return {
        "mode": "closed", "concurrency": concurrency, "rate": None, "arrivals": None, "duration_s": 10.0,
        "requests": 100, "ok": 100, "errors": {}, "p50_ms": p50, "p95_ms": p50 * 2, "p99_ms": p50 * 3,
        "mean_ms": p50, "max_ms": p50 * 4, "throughput_rps": throughput, "mean_batch_size": mean_batch,
        "batches": 50, "max_send_lag_ms": None, "server_backend": "onnxruntime-cpu", "max_batch_size": 16,
        "max_batch_delay_ms": 2.0, "image": "256x256 JPEG",
        "server_p50_ms": {"decode": 0.5, "queue": 0.1, "inference": p50 - 3.0, "encode": 1.0,
                          "total": p50 - 1.0},
    }  # fmt: skip


def _report() -> dict[str, Any]:
    backends = [
        _backend(name, batch, 10.0 * batch)
        for name in ("onnxruntime-cpu", "pytorch-eager")
        for batch in (1, 2, 4)
    ]
    http = [_http(1, 14.0, 70.0, 1.0), _http(32, 200.0, 160.0, 7.5)]
    stages = [{"input_size": "256x256", "stage": "decode_resize", "p50_ms": 1.0, "p90_ms": 1.2, "p99_ms": 1.5,
               "detail": "x"}]  # fmt: skip
    return build_report(
        device={"kind": "cpu", "name": "Test CPU (2 cores)", "cpu": "Test CPU", "cpu_count": 2},
        host={"hostname": "h"},
        versions={"onnxruntime": "1.0", "torch": None},
        model={
            "dir": "/m",
            "run_dir": None,
            "size": "small",
            "input_height": 64,
            "input_width": 64,
            "threshold": 0.1,
            "weights": "random",
            "version": "abc",
        },
        settings={"batch_sizes": [1, 2, 4]},
        backends=backends,
        stages=stages,
        http=http,
        server_backend="onnxruntime-cpu",
        notes=["random-init weights"],
        created=datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    )


def test_built_report_validates() -> None:
    report = _report()
    assert report["schema_version"] == SCHEMA_VERSION
    assert validate_report(report) == []
    json.loads(json.dumps(report, allow_nan=False))  # plain JSON, no NaN


@pytest.mark.parametrize(
    ("path", "change", "message"),
    [
        (("backends", 0), lambda row: row.pop("p50_ms"), "backends[0].p50_ms: missing"),
        (("http", 1), lambda row: row.update(throughput_rps="fast"), "http[1].throughput_rps: expected"),
        (("model",), lambda model: model.pop("size"), "model.size: missing"),
        (
            ("backends", 2),
            lambda row: row.update(batch_size=True),
            "backends[2].batch_size: expected a number",
        ),
    ],
)
def test_validation_names_what_is_wrong(path: tuple, change: Any, message: str) -> None:
    report = copy.deepcopy(_report())
    target: Any = report
    for key in path:
        target = target[key]
    change(target)
    problems = validate_report(report)
    assert any(message in problem for problem in problems), problems


def test_validation_rejects_missing_sections_and_wrong_version() -> None:
    report = _report()
    del report["derived"]
    assert "report.derived: missing" in validate_report(report)
    report = _report()
    report["schema_version"] = SCHEMA_VERSION + 1
    assert any("schema_version" in problem for problem in validate_report(report))


def test_markdown_has_a_row_per_backend_and_batch_size() -> None:
    report = _report()
    text = markdown_report(report)
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| onnxruntime-cpu |") or line.startswith("| pytorch-eager |")
    ]
    assert len(rows) == len(report["backends"]) == 6
    for row in report["backends"]:
        assert any(
            f"| {row['batch_size']} | {row['p50_ms']:,.2f} |" in line for line in rows if row["name"] in line
        )
    assert "Test CPU (2 cores)" in text
    assert "random weights" in text
    assert "2.29x" in text  # c32 / c1 = 160 / 70


def test_derived_numbers() -> None:
    report = _report()
    derived = derive(report["backends"], report["http"], "onnxruntime-cpu")
    assert derived["http_c32_over_c1"] == pytest.approx(160.0 / 70.0)
    assert derived["server_overhead_ms"] == pytest.approx(14.0 - 10.0)  # HTTP p50 c1 - ORT CPU p50 batch 1
    assert derived["server_overhead_same_requests_ms"] == pytest.approx(3.0)  # minus the server's inference
    assert derived["best_images_per_s"]["onnxruntime-cpu fp32"] == pytest.approx(100.0)
    no_c32 = derive(report["backends"], report["http"][:1], "onnxruntime-cpu")
    assert no_c32["http_c32_over_c1"] is None


def test_server_overhead_uses_the_row_with_copies() -> None:
    backends = [_backend("tensorrt", 1, 1.0, transfer=False), _backend("tensorrt", 1, 1.5, transfer=True)]
    derived = derive(backends, [_http(1, 4.0, 250.0, 1.0)], "tensorrt")
    assert derived["server_overhead_ms"] == pytest.approx(2.5)


def test_a_negative_server_overhead_is_reported_as_not_meaningful() -> None:
    report = _report()
    derived = derive(report["backends"], report["http"], "onnxruntime-cpu", reference_b1_ms=20.0)
    assert derived["server_overhead_ms"] is None  # HTTP p50 14 ms < backend 20 ms: drift, not a cost
    assert "not meaningful" in derived["server_overhead_note"]
    assert derived["server_overhead_same_requests_ms"] == pytest.approx(3.0)  # still measured
    report["derived"] = derived
    assert "came out below the backend timed separately (20.00 ms)" in markdown_report(report)
    assert derive(report["backends"], report["http"], "onnxruntime-cpu")["server_overhead_note"] is None


def test_write_report_makes_json_markdown_and_png(tmp_path: Path) -> None:
    paths = write_report(_report(), tmp_path)
    assert paths["json"].name == "test-cpu-2-cores-2025-01-02.json"
    assert json.loads(paths["json"].read_text())["backends"][0]["name"] == "onnxruntime-cpu"
    assert paths["markdown"].read_text().startswith("## EfficientAD benchmark")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_refuses_an_invalid_report(tmp_path: Path) -> None:
    report = _report()
    del report["backends"][0]["images_per_s"]
    with pytest.raises(ValueError, match=r"backends\[0\].images_per_s"):
        write_report(report, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_every_markdown_table_row_has_as_many_cells_as_its_header() -> None:
    lines = markdown_report(_report()).splitlines()
    tables: list[list[str]] = []
    for index, line in enumerate(lines):
        if line.startswith("|"):
            if not lines[index - 1].startswith("|"):
                tables.append([])
            tables[-1].append(line)
    assert len(tables) == 3  # backends, stages, HTTP
    for table in tables:
        widths = {line.count("|") for line in table}
        assert len(widths) == 1, table


def test_server_overhead_prefers_the_backend_re_timed_before_the_http_runs() -> None:
    report = _report()
    derived = derive(report["backends"], report["http"], "onnxruntime-cpu", reference_b1_ms=12.5)
    assert derived["server_overhead_ms"] == pytest.approx(14.0 - 12.5)
    assert derived["backend_b1_p50_ms"] == 12.5 and derived["backend_b1_source"].startswith("re-timed")
    assert (
        derive(report["backends"], report["http"], "onnxruntime-cpu")["backend_b1_source"] == "backends table"
    )
