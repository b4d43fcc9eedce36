"""`efficientad calibrate`: the threshold rule, the AUROC, and the real command on real exported models.

No mocks: small random-init models exported through the real exporter (tests/server/conftest.py), the
shipped cookie checkpoint when present, the cookie sample images, and `efficientad.cli.main`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from efficientad.cli import EXIT_USER_ERROR, main
from efficientad.model_dir import ModelDirError, read_model_dir, write_threshold
from efficientad.scores import false_alarm_rate as false_alarm_rate_of
from efficientad.scores import image_auroc, labelled, miss_rate
from server.calibrate import find_images, load_image
from tests.server.conftest import COOKIE, REPO, TEST_THRESHOLD, reference_scores

GOOD = COOKIE / "train" / "good"
DEFECTS = COOKIE / "test" / "anomaly"
SHIPPED_CHECKPOINT = REPO / "samples" / "models" / "cookie"


# --- write_threshold on a model dir (no export needed: any bytes with a matching hash) --------------------


def _fake_model_dir(folder: Path, threshold: float | None) -> Path:
    folder.mkdir(parents=True)
    payload = b"not really onnx"
    (folder / "model.onnx").write_bytes(payload)
    document = {
        "format": "efficientad-model",
        "format_version": 1,
        "input": {"height": 64, "width": 64},
        "model_size": "small",
        "threshold": threshold,
        "checkpoint": {"sha256": "ab" * 32},
        "onnx": {"file": "model.onnx", "sha256": hashlib.sha256(payload).hexdigest()},
    }
    (folder / "model.json").write_text(json.dumps(document, indent=2) + "\n")
    (folder / "model.json").chmod(0o644)
    return folder


def test_write_threshold_keeps_the_history_and_the_file_mode(tmp_path: Path) -> None:
    model_dir = _fake_model_dir(tmp_path / "model", threshold=None)
    first = write_threshold(model_dir, 0.5, details={"source": "test", "good_images": 3})
    second = write_threshold(model_dir, 0.25, details={"source": "test", "good_images": 4})

    document = json.loads((model_dir / "model.json").read_text())
    assert document["threshold"] == 0.25 and read_model_dir(model_dir).threshold == 0.25
    assert document["threshold_history"] == [first, second]
    assert (first["threshold"], first["new_threshold"]) == (None, 0.5)
    assert (second["threshold"], second["new_threshold"], second["good_images"]) == (0.5, 0.25, 4)
    replaced_at = datetime.datetime.fromisoformat(second["replaced_at"])
    assert replaced_at.utcoffset() == datetime.timedelta(0)
    assert (model_dir / "model.json").stat().st_mode & 0o777 == 0o644
    assert sorted(path.name for path in model_dir.iterdir()) == ["model.json", "model.onnx"]  # no temp


def test_write_threshold_refuses_a_graph_that_does_not_match(tmp_path: Path) -> None:
    model_dir = _fake_model_dir(tmp_path / "model", threshold=0.1)
    (model_dir / "model.onnx").write_bytes(b"swapped")
    before = (model_dir / "model.json").read_bytes()
    with pytest.raises(ModelDirError, match="does not match"):
        write_threshold(model_dir, 0.5, details={"source": "test"})
    assert (model_dir / "model.json").read_bytes() == before


def test_write_threshold_refuses_nan_and_reserved_details(tmp_path: Path) -> None:
    model_dir = _fake_model_dir(tmp_path / "model", threshold=0.1)
    with pytest.raises(ValueError, match="finite"):
        write_threshold(model_dir, float("nan"), details={})
    with pytest.raises(ValueError, match="new_threshold"):
        write_threshold(model_dir, 0.2, details={"new_threshold": 3})


# --- images ---------------------------------------------------------------------------------------------


def test_find_images_is_recursive_sorted_and_by_suffix(tmp_path: Path) -> None:
    for name in ("b/2.PNG", "a.jpg", "b/1.webp", "c/d/e.tiff", "notes.txt", "x.jpeg.bak", "y.bmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [path.relative_to(tmp_path).as_posix() for path in find_images(tmp_path)]
    assert found == ["a.jpg", "b/1.webp", "b/2.PNG", "c/d/e.tiff", "y.bmp"]
    assert len(find_images(GOOD)) == 10 and len(find_images(DEFECTS)) == 6


# --- the command on a real exported model ---------------------------------------------------------------


def _copy_model(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main(["calibrate", *(str(arg) for arg in argv), "--threads", "1"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_calibrate_end_to_end_without_torch(small_model_dir: Path, tmp_path: Path) -> None:
    """The command in a fresh process: the scores are the graph's own on the server's decode, no torch,
    onnx, training or export module is loaded beyond the stage CLIs, and model.json is left alone."""
    model_dir = _copy_model(small_model_dir, tmp_path)
    before = (model_dir / "model.json").read_bytes()
    report_path = tmp_path / "report.json"
    code = (
        "import sys; from efficientad.cli import main; "
        f"code = main(['calibrate', {str(model_dir)!r}, {str(GOOD)!r}, '--defect-dir', {str(DEFECTS)!r}, "
        f"'--json', {str(report_path)!r}, '--threads', '1', '--batch-size', '3']); "
        "heavy = ('torch', 'onnx', 'training', 'export'); "
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy); "
        "print('LOADED', *loaded); sys.exit(code)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # efficientad.cli registers every stage's subcommands, so their (light) cli modules are imported, and
    # the train CLI's help reads the torch-free recipe presets
    loaded = next(line for line in result.stdout.splitlines() if line.startswith("LOADED")).split()[1:]
    assert set(loaded) <= {"training", "training.cli", "training.recipes", "export", "export.cli"}, loaded
    assert "threshold" in result.stdout and "AUROC" in result.stdout and "not written" in result.stdout
    assert "cannot resolve a false-alarm rate of 0.01 (that needs at least 100)" in result.stderr

    report = json.loads(report_path.read_text())
    good = {Path(item["path"]): item["score"] for item in report["good"]["images"]}
    defects = {Path(item["path"]): item["score"] for item in report["defects"]["images"]}
    assert list(good) == find_images(GOOD) and list(defects) == find_images(DEFECTS)
    info = read_model_dir(model_dir)
    paths = [*good, *defects]
    _, expected = reference_scores(model_dir, [load_image(path, info) for path in paths])
    np.testing.assert_allclose([*good.values(), *defects.values()], expected, rtol=1e-5, atol=1e-6)

    assert report["threshold"] == max(good.values())  # 10 images cannot resolve 1 %: the max
    assert report["rate_resolvable"] is False and report["observed_false_alarm_rate"] == 0.0
    assert report["miss_rate"] == miss_rate(list(defects.values()), report["threshold"])
    assert report["auroc"] == pytest.approx(
        image_auroc(*labelled(list(good.values()), list(defects.values())))
    )
    assert report["current_threshold"] == TEST_THRESHOLD
    assert report["current_false_alarm_rate"] == false_alarm_rate_of(list(good.values()), TEST_THRESHOLD)
    assert report["model_version"] == info.version and report["written"] is False
    assert (model_dir / "model.json").read_bytes() == before


def test_write_changes_only_the_threshold_and_its_history(
    small_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = _copy_model(small_model_dir, tmp_path)
    onnx_bytes = (model_dir / "model.onnx").read_bytes()
    before = read_model_dir(model_dir)
    original = json.loads((model_dir / "model.json").read_text())

    code, out, err = _run(
        capsys, model_dir, GOOD, "--false-alarm-rate", "0.2", "--write", "--json", tmp_path / "a.json"
    )
    assert code == 0, err
    first = json.loads((tmp_path / "a.json").read_text())
    good_scores = [item["score"] for item in first["good"]["images"]]
    assert first["threshold"] == sorted(good_scores)[7]  # k = ceil(10 * 0.8) = 8
    assert first["rate_resolvable"] is True and first["written"] is True
    assert "written" in out and "/reload" in out

    after = read_model_dir(model_dir)
    assert after.threshold == first["threshold"] != before.threshold
    assert after.version == before.version
    assert (model_dir / "model.onnx").read_bytes() == onnx_bytes
    document = json.loads((model_dir / "model.json").read_text())
    (entry,) = document["threshold_history"]
    assert entry["threshold"] == TEST_THRESHOLD and entry["new_threshold"] == first["threshold"]
    assert entry["source"] == "efficientad calibrate"
    assert (entry["false_alarm_rate"], entry["good_images"], entry["model_version"]) == (
        0.2,
        10,
        before.version,
    )
    assert "auroc" not in entry  # no defects given
    unchanged = {
        key: value for key, value in document.items() if key not in ("threshold", "threshold_history")
    }
    assert unchanged == {key: value for key, value in original.items() if key != "threshold"}

    code, _, err = _run(
        capsys, model_dir, GOOD, "--defect-dir", DEFECTS, "--write", "--json", tmp_path / "b.json"
    )
    assert code == 0, err
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["current_threshold"] == first["threshold"]
    assert second["current_false_alarm_rate"] == pytest.approx(0.2)
    history = json.loads((model_dir / "model.json").read_text())["threshold_history"]
    assert [item["threshold"] for item in history] == [TEST_THRESHOLD, first["threshold"]]
    assert history[1]["defect_images"] == 6 and 0.0 <= history[1]["auroc"] <= 1.0
    assert read_model_dir(model_dir).threshold == second["threshold"] == max(good_scores)
    assert read_model_dir(model_dir).version == before.version


def _assert_one_line_error(code: int, err: str, *names: object) -> None:
    assert code == EXIT_USER_ERROR
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for name in names:
        assert str(name) in errors[0], errors[0]


def test_missing_empty_or_foreign_folders_are_one_line_errors(
    small_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    _assert_one_line_error(*_run(capsys, small_model_dir, missing)[::2], missing)
    _assert_one_line_error(*_run(capsys, small_model_dir, empty)[::2], empty, "no images")
    _assert_one_line_error(*_run(capsys, small_model_dir, GOOD, "--defect-dir", missing)[::2], missing)
    _assert_one_line_error(*_run(capsys, COOKIE, GOOD)[::2], COOKIE / "model.json", "not a model directory")
    _assert_one_line_error(*_run(capsys, missing, GOOD)[::2], missing, "model directory not found")
    _assert_one_line_error(*_run(capsys, small_model_dir, COOKIE, "--defect-dir", DEFECTS)[::2], DEFECTS)
    _assert_one_line_error(*_run(capsys, small_model_dir, GOOD, "--false-alarm-rate", "1.5")[::2], "1.5")


def test_an_undecodable_image_is_a_one_line_error_naming_it(
    small_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = _copy_model(small_model_dir, tmp_path)
    before = (model_dir / "model.json").read_bytes()
    good = tmp_path / "good"
    shutil.copytree(GOOD, good)
    (good / "late" / "zz-broken.jpg").parent.mkdir()
    (good / "late" / "zz-broken.jpg").write_bytes(b"this is not a JPEG")
    code, _, err = _run(capsys, model_dir, good, "--write")
    _assert_one_line_error(code, err, good / "late" / "zz-broken.jpg")
    assert (model_dir / "model.json").read_bytes() == before  # nothing written on failure


# --- the shipped cookie model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """samples/models/cookie (a checkpoint) exported to a model dir, once for this module (~30 s)."""
    if not (SHIPPED_CHECKPOINT / "checkpoint.json").is_file():
        pytest.skip(f"no shipped checkpoint at {SHIPPED_CHECKPOINT}")
    from export.exporter import export_model

    out_dir = tmp_path_factory.mktemp("shipped") / "cookie"
    export_model(SHIPPED_CHECKPOINT, out_dir)
    return out_dir


def test_calibrate_the_shipped_cookie_model(
    shipped_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = read_model_dir(shipped_model_dir).version
    report_path = tmp_path / "cookie.json"
    argv = (shipped_model_dir, GOOD, "--defect-dir", DEFECTS, "--write", "--json", report_path)
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    print(out)  # shown with pytest -s: the table on the real model

    report = json.loads(report_path.read_text())
    good_scores = [item["score"] for item in report["good"]["images"]]
    assert len(good_scores) == 10 and len(report["defects"]["images"]) == 6
    assert report["threshold"] == max(good_scores)  # rate 0.01 with 10 images: the max good score
    assert isinstance(report["auroc"], float) and 0.0 <= report["auroc"] <= 1.0
    info = read_model_dir(shipped_model_dir)
    assert info.threshold == max(good_scores) and info.version == version


def test_a_calibrated_threshold_is_served_after_a_reload(
    shipped_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The line's workflow: serve, calibrate on good images with --write, reload, and the server uses it."""
    import httpx

    from server.app import create_app
    from server.config import Settings
    from tests.server.conftest import running_server

    model_dir = Path(shutil.copytree(shipped_model_dir, tmp_path / "cookie"))
    settings = Settings(model_dirs=[model_dir], backend="onnxruntime-cpu", intra_op_threads=1)
    with running_server(create_app(settings)) as url:
        before = httpx.get(f"{url}/v1/model").json()
        code, _, err = _run(capsys, model_dir, GOOD, "--false-alarm-rate", "0.2", "--write")
        assert code == 0, err
        written = read_model_dir(model_dir).threshold
        assert written != before["threshold"]
        reload = httpx.post(f"{url}/v1/models/cookie/reload", timeout=120)
        assert reload.status_code == 200, reload.text
        after = httpx.get(f"{url}/v1/model").json()
        assert after["threshold"] == written and after["version"] == before["version"]
        answer = httpx.post(
            f"{url}/predict?heatmap=none",
            content=(DEFECTS / "anomaly-10.jpg").read_bytes(),
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        ).json()
        assert answer["threshold"] == written and answer["is_anomaly"] == (answer["score"] > written)
