"""The torch-free model-dir reader and engine cache naming (no TensorRT needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from efficientad.cli import main
from efficientad.model_dir import (
    ModelDirError,
    engine_filename,
    find_engine,
    parse_engine_filename,
    read_model_dir,
)

REPO = Path(__file__).resolve().parents[2]


def test_server_side_modules_do_not_import_torch():
    code = (
        "import sys; import export, export.tensorrt_engine, export.cli; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'onnx' not in sys.modules and 'tensorrt' not in sys.modules; print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def fake_complete_dir(folder: Path, document: dict) -> Path:
    """A model dir whose model.onnx is any bytes, with a matching hash: enough for the reader."""
    import hashlib

    folder.mkdir(parents=True)
    payload = b"not really onnx"
    (folder / "model.onnx").write_bytes(payload)
    document = {**document, "onnx": {"file": "model.onnx", "sha256": hashlib.sha256(payload).hexdigest()}}
    (folder / "model.json").write_text(json.dumps(document))
    return folder


MINIMAL = {
    "format": "efficientad-model",
    "format_version": 1,
    "input": {"height": 128, "width": 96},
    "model_size": "medium",
    "threshold": None,
    "checkpoint": {"sha256": "ab" * 32},
}


def test_read_minimal_model_dir(tmp_path):
    info = read_model_dir(fake_complete_dir(tmp_path / "cookies", MINIMAL))
    assert (info.name, info.input_height, info.input_width, info.model_size) == ("cookies", 128, 96, "medium")
    assert info.threshold is None and info.version == info.metadata["onnx"]["sha256"][:12]
    assert info.engines_dir == tmp_path / "cookies" / "engines"
    assert read_model_dir(tmp_path / "cookies", name="other").name == "other"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.onnx").unlink(), "model.onnx is missing"),
        (lambda d: (d / "model.json").unlink(), "model.json is missing"),
        (lambda d: (d / "model.json").write_text("{not json"), "not valid JSON"),
        (
            lambda d: (d / "model.json").write_text(json.dumps({"format": "other"})),
            "not an EfficientAD model",
        ),
        (
            lambda d: (d / "model.json").write_text(json.dumps({**MINIMAL, "format_version": 99})),
            "version 99",
        ),
        (lambda d: (d / "model.onnx").write_bytes(b"swapped"), "does not match"),
    ],
)
def test_read_model_dir_names_the_problem(tmp_path, damage, message):
    folder = fake_complete_dir(tmp_path / "model", MINIMAL)
    damage(folder)
    with pytest.raises(ModelDirError, match=message) as caught:
        read_model_dir(folder)
    assert str(folder) in str(caught.value)


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelDirError, match="not found"):
        read_model_dir(tmp_path / "absent")


def test_engine_filename_round_trip():
    name = engine_filename("NVIDIA H100 80GB HBM3", "10.3.0", 32)
    assert name == "NVIDIA-H100-80GB-HBM3__trt10.3.0__b32.plan"
    assert parse_engine_filename(name) == ("NVIDIA-H100-80GB-HBM3", "10.3.0", 32)
    assert parse_engine_filename("notes.txt") is None
    assert engine_filename("Tesla T4 (PCIe)/x", "10.0.1.6", 1) == "Tesla-T4-PCIe-x__trt10.0.1.6__b1.plan"
    with pytest.raises(ValueError):
        engine_filename("GPU", "10.0", 0)


def test_find_engine_picks_the_smallest_sufficient_plan(tmp_path):
    engines = tmp_path / "engines"
    assert find_engine(tmp_path, "NVIDIA L4", "10.3.0", 8) is None  # no engines folder yet
    engines.mkdir()
    for gpu, trt, batch in [
        ("NVIDIA L4", "10.3.0", 4),
        ("NVIDIA L4", "10.3.0", 16),
        ("NVIDIA L4", "10.3.0", 64),
        ("NVIDIA L4", "10.2.0", 8),  # other TensorRT version
        ("NVIDIA A10", "10.3.0", 8),  # other GPU
    ]:
        (engines / engine_filename(gpu, trt, batch)).write_bytes(b"plan")
    (engines / "timing.cache").write_bytes(b"cache")
    assert find_engine(tmp_path, "NVIDIA L4", "10.3.0", 8).name == "NVIDIA-L4__trt10.3.0__b16.plan"
    assert find_engine(tmp_path, "NVIDIA L4", "10.3.0", 4).name == "NVIDIA-L4__trt10.3.0__b4.plan"
    assert find_engine(tmp_path, "NVIDIA L4", "10.3.0", 65) is None
    assert find_engine(tmp_path, "NVIDIA T4", "10.3.0", 1) is None
    assert find_engine(tmp_path, "NVIDIA A10", "10.2.0", 1) is None


def test_engine_command_errors(tmp_path, capsys):
    folder = fake_complete_dir(tmp_path / "model", MINIMAL)
    (folder / "model.onnx").unlink()
    assert main(["engine", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "model.onnx is missing" in err and "Traceback" not in err
    assert not (folder / "engines").exists()


def test_engine_command_without_tensorrt(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    folder = fake_complete_dir(tmp_path / "model", MINIMAL)
    assert main(["engine", str(folder), "--max-batch", "8"]) == 2
    assert "TensorRT" in capsys.readouterr().err
    assert not (folder / "engines").exists()
