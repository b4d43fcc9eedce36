"""`efficientad distill|train|evaluate`: registered without torch; bad input is one clear line, exit 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from efficientad.cli import build_parser, main
from tests.training.conftest import ROOT, tiny_train_args


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "efficientad", "--log-level", "ERROR", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_training_cli_registers_without_importing_torch() -> None:
    code = (
        "import argparse, sys; import training.cli as c; p = argparse.ArgumentParser(); "
        "c.register(p.add_subparsers()); assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_subcommands_and_their_flags_are_registered() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["train", "data", "--out", "run", "--size", "medium", "--teacher", "random", "--resume"]
    )
    assert (args.size, args.teacher, args.resume, args.steps) == ("medium", "random", True, None)
    args = parser.parse_args(["distill", "images", "--out", "t.safetensors", "--backbone", "wide-resnet101"])
    assert args.backbone == "wide-resnet101" and args.steps is None  # None: DistillSettings' default
    args = parser.parse_args(["distill", "images", "--out", "t", "--crop-size", "96", "--precision", "bf16"])
    assert (args.crop_size, args.precision, args.resume) == (96, "bf16", False)
    args = parser.parse_args(["evaluate", "run", "data", "--json", "out.json"])
    assert args.json == Path("out.json") and args.device == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "data", "--out", "run", "--resume", "--force"])


def test_missing_data_folder_is_one_line_exit_2_no_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data"
    result = _run_cli(*tiny_train_args(missing, tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: data folder not found: {missing}"]
    assert "Traceback" not in result.stderr


def test_unreadable_image_is_one_line_exit_2_no_traceback(tmp_path: Path, cookie_copy: Path) -> None:
    broken = cookie_copy / "train" / "good" / "zz-broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    result = _run_cli(*tiny_train_args(cookie_copy, tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read image") and str(broken) in lines[0]
    assert not (tmp_path / "run" / "checkpoint.json").exists()


def _bad_layouts(root: Path) -> dict[str, tuple[Path, str]]:
    """Copies of samples/cookie broken in ways the CLI must explain: {case: (data dir, expected text)}."""
    cases = {}
    empty = root / "empty"
    empty.mkdir()
    cases["empty folder"] = (empty, f"data folder is empty: {empty}")
    layout = root / "layout"
    shutil.copytree(ROOT / "samples" / "cookie", layout)
    shutil.move(layout / "train" / "good", layout / "good")
    cases["wrong layout"] = (layout, f"{layout / 'train' / 'good'} not found")
    orphan = root / "orphan"
    shutil.copytree(ROOT / "samples" / "cookie", orphan)
    (orphan / "test" / "anomaly" / "anomaly-11.jpg").unlink()
    cases["mask without image"] = (
        orphan,
        f"mask without image: {orphan / 'ground_truth/anomaly/anomaly-11_mask.png'}",
    )
    bad_test = root / "bad_test"
    shutil.copytree(ROOT / "samples" / "cookie", bad_test)
    (bad_test / "test" / "good" / "test-normal-1.jpg").write_bytes(b"truncated")
    cases["unreadable test image"] = (
        bad_test,
        f"cannot read image {bad_test / 'test/good/test-normal-1.jpg'}",
    )
    return cases


def test_bad_data_layouts_exit_2_naming_the_path(tmp_path: Path, capsys) -> None:
    for case, (data_dir, expected) in _bad_layouts(tmp_path).items():
        code = main(tiny_train_args(data_dir, tmp_path / "runs" / data_dir.name))
        err = capsys.readouterr().err
        assert code == 2, case
        assert expected in err, f"{case}: {err}"
        assert "Traceback" not in err, case
        assert not (tmp_path / "runs" / data_dir.name / "checkpoint.json").exists(), case


def test_evaluate_and_distill_bad_paths_exit_2(tmp_path: Path, cookie_dir: Path, capsys) -> None:
    assert main(["evaluate", str(tmp_path / "no-run"), str(cookie_dir), "--device", "cpu"]) == 2
    assert f"checkpoint not found: {tmp_path / 'no-run'}" in capsys.readouterr().err
    code = main(
        ["distill", str(tmp_path / "no-images"), "--out", str(tmp_path / "t.safetensors"), "--steps", "1",
         "--image-size", "64", "--device", "cpu"]
    )  # fmt: skip
    assert code == 2
    assert str(tmp_path / "no-images") in capsys.readouterr().err
    assert not (tmp_path / "t.safetensors").exists()
