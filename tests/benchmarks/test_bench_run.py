"""A tiny real `efficientad bench`: random 64 px model exported for real, ONNX Runtime CPU, the real server
in a subprocess under load from a separate client process; all three outputs must come out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.model_setup import prepare_model, random_model_key
from benchmarks.report import validate_report
from efficientad.cli import main


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One random 64 px model for the module: exported by the first bench run, reused by the next."""
    return tmp_path_factory.mktemp("bench-cache")


def test_tiny_bench_produces_json_markdown_and_plot(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    argv = [
        "bench", "--image-size", "64", "--batch-sizes", "1,2", "--repeats", "1", "--iterations", "3",
        "--warmup", "1", "--no-pytorch", "--stage-sizes", "256", "--concurrency", "1,4", "--duration", "2",
        "--http-warmup", "0.5", "--rates", "4", "--out", str(out), "--work-dir", str(tmp_path / "work"),
        "--cache-dir", str(cache_dir), "--no-training", "--overhead-duration", "0.5",
    ]  # fmt: skip
    assert main(argv) == 0

    json_files, md_files, png_files = (sorted(out.glob(f"*.{ext}")) for ext in ("json", "md", "png"))
    assert len(json_files) == len(md_files) == len(png_files) == 1
    report = json.loads(json_files[0].read_text())
    assert validate_report(report) == []
    assert report["model"]["weights"] == "random" and report["model"]["input_height"] == 64
    assert report["training_speed"]["rows"] == []  # --no-training (tests/benchmarks/test_training_speed.py)

    backends = [(row["name"], row["batch_size"]) for row in report["backends"]]
    assert backends == [("onnxruntime-cpu", 1), ("onnxruntime-cpu", 2)]
    assert all(row["p50_ms"] > 0 and row["images_per_s"] > 0 for row in report["backends"])
    assert {row["stage"] for row in report["stages"]} >= {
        "decode_resize",
        "inference_b1",
        "heatmap_png_model",
    }

    closed = {row["concurrency"]: row for row in report["http"] if row["mode"] == "closed"}
    assert set(closed) == {1, 4}
    for row in report["http"]:
        assert row["ok"] > 0 and row["errors"] == {}, row
        assert row["server_backend"] == "onnxruntime-cpu"
    assert closed[1]["mean_batch_size"] == pytest.approx(1.0)  # one request in flight: batches of one
    open_loop = [row for row in report["http"] if row["mode"] == "open"]
    assert len(open_loop) == 1 and open_loop[0]["rate"] == 4.0
    assert report["derived"]["server_overhead_ms"] is not None

    # the random model was cached: a second resolution reuses it instead of exporting again
    (cached_model,) = cache_dir.glob("random-small-64px-*/model")
    assert report["model"]["dir"] == str(cached_model)
    onnx_mtime = (cached_model / "model.onnx").stat().st_mtime_ns
    again = prepare_model(
        model_dir=None, run_dir=None, work_dir=tmp_path / "unused", model_size="small", image_size=64,
        cache_dir=cache_dir,
    )  # fmt: skip
    assert again.model_dir == cached_model and again.random_weights
    assert (cached_model / "model.onnx").stat().st_mtime_ns == onnx_mtime

    overhead = report["server_overhead"]  # the null model's runs (tests/benchmarks/test_server_overhead.py)
    assert {(row["target"], row["concurrency"]) for row in overhead["rows"]} >= {("live", 1), ("predict", 32)}
    assert all(row["errors"] == {} and row["requests"] > 0 for row in overhead["rows"])
    assert len(overhead["targets"]) == 4

    printed = capsys.readouterr().out
    assert "| onnxruntime-cpu | fp32 | cpu | n/a (CPU) | 2 |" in printed
    assert "### Server overhead against the floor (null model" in printed
    assert md_files[0].read_text() in printed
    assert (tmp_path / "work" / "server.log").is_file()


def test_a_server_that_cannot_start_costs_the_http_rows_only(tmp_path: Path, cache_dir: Path) -> None:
    """TensorRT on a machine without it: the server exits at start-up; the backend rows are still written."""
    out = tmp_path / "results"
    argv = [
        "bench", "--image-size", "64", "--batch-sizes", "1", "--repeats", "1", "--iterations", "2",
        "--warmup", "0", "--no-pytorch", "--no-stages", "--server-backend", "tensorrt", "--out", str(out),
        "--cache-dir", str(cache_dir), "--no-training", "--no-server-overhead",
    ]  # fmt: skip
    assert main(argv) == 0
    (json_file,) = out.glob("*.json")
    report = json.loads(json_file.read_text())
    assert validate_report(report) == []
    assert report["http"] == [] and len(report["backends"]) == 1
    assert any(note.startswith("HTTP runs skipped") for note in report["notes"]), report["notes"]


def test_bench_names_a_missing_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main(["bench", "--model-dir", str(missing), "--out", str(tmp_path)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_random_model_cache_key_names_size_and_code() -> None:
    key = random_model_key("small", 256)
    assert key.startswith("random-small-256px-") and key == random_model_key("small", 256)
    assert random_model_key("medium", 256) != key and random_model_key("small", 128) != key
