"""`efficientad export`: the CLI, replacing with --force, and clear failures that leave nothing behind."""

from __future__ import annotations

import json
import shutil

import pytest

from efficientad.cli import main
from efficientad.model_dir import read_model_dir
from export.exporter import ExportError, export_model
from training.checkpoint import CheckpointError
from training.images import DataError

from .conftest import PARITY_IMAGES

TWO_IMAGES = [str(p) for p in PARITY_IMAGES[:2]]


def leftovers(folder):
    """Hidden staging or retired folders the exporter may have left beside its output."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_cli_export_then_refuse_then_force(tiny_run, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["export", str(tiny_run), "--out", str(out), "--parity-images", *TWO_IMAGES]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "parity" in printed and "randomly initialised" in printed
    first = read_model_dir(out)
    assert (first.input_height, first.input_width) == (64, 64)
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)

    # existing output without --force: a clear one-line error, exit 2, nothing touched
    assert main(["export", str(tiny_run), "--out", str(out), "--parity-images", *TWO_IMAGES]) == 2
    assert "already exists" in capsys.readouterr().err
    assert read_model_dir(out).version == first.version

    # --force replaces it (keeping nothing of the old one) and leaves no hidden folders behind
    (out / "engines").mkdir()
    (out / "engines" / "stale.plan").write_bytes(b"old")
    assert (
        main(["export", str(tiny_run), "--out", str(out), "--force", "--parity-images", TWO_IMAGES[0]]) == 0
    )
    assert not (out / "engines").exists()
    assert json.loads((out / "model.json").read_text())["parity"]["images"] == [PARITY_IMAGES[0].name]
    assert leftovers(tmp_path) == []


def test_force_never_replaces_a_folder_that_is_not_a_model_dir(tiny_run, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a model directory"):
        export_model(tiny_run, out, force=True, parity_images=PARITY_IMAGES[:1])
    assert (out / "notes.txt").read_text() == "keep me"


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_truncated_checkpoint(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    tensors = run / "checkpoint.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated|corrupt"):
        export_model(run, tmp_path / "model", parity_images=PARITY_IMAGES[:1])
    assert not (tmp_path / "model").exists() and leftovers(tmp_path) == []


def test_foreign_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.json").write_text(json.dumps({"format": "something-else"}))
    (run / "checkpoint.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="not an EfficientAD checkpoint"):
        export_model(run, tmp_path / "model", parity_images=PARITY_IMAGES[:1])
    assert not (tmp_path / "model").exists()


def test_failure_after_the_graph_is_written_leaves_nothing(tiny_run, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(PARITY_IMAGES[0].read_bytes()[:200])  # a truncated JPEG: fails at decode, after export
    out = tmp_path / "out" / "model"
    with pytest.raises(DataError, match=r"broken\.jpg"):
        export_model(tiny_run, out, parity_images=[broken])
    assert not out.exists() and leftovers(out.parent) == []


def test_degenerate_statistics_are_refused(tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from training.checkpoint import file_sha256

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    tensors = load_file(str(run / "checkpoint.safetensors"))
    tensors["stats.q_st_b"] = tensors["stats.q_st_a"].clone()  # would divide by zero
    save_file(tensors, str(run / "checkpoint.safetensors"))
    document = json.loads((run / "checkpoint.json").read_text())
    document["tensors_sha256"] = file_sha256(run / "checkpoint.safetensors")
    (run / "checkpoint.json").write_text(json.dumps(document))
    with pytest.raises(ExportError, match="q_st_b"):
        export_model(run, tmp_path / "model", parity_images=PARITY_IMAGES[:1])
    assert not (tmp_path / "model").exists()


def test_bad_opset_and_parity_paths(tiny_run, tmp_path):
    with pytest.raises(ExportError, match="opset 16"):
        export_model(tiny_run, tmp_path / "model", opset=16)
    with pytest.raises(ExportError, match=r"missing\.png"):
        export_model(tiny_run, tmp_path / "model", parity_images=[tmp_path / "missing.png"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_triton_subcommand(small_model_dir, tmp_path, capsys):
    repository = tmp_path / "triton"
    assert main(["export-triton", str(small_model_dir), "--out", str(repository), "--max-batch", "8"]) == 0
    assert "Triton" in capsys.readouterr().out
    configs = list(repository.rglob("config.pbtxt"))
    assert configs and "max_batch_size: 8" in configs[0].read_text()
    assert main(["export-triton", str(small_model_dir), "--out", str(repository)]) == 2  # exists, no --force
