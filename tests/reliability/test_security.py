"""Security checks: nothing unpickles, model files are safetensors/ONNX only and a pickle in their place
is refused without running it, the API key is compared in constant time and never logged, and every
request limit is enforced and documented with its default."""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from server.config import MIB, Settings
from tests.reliability import exported_model
from tests.server.conftest import free_port, png_bytes, running_server

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("training", "export", "server", "efficientad", "benchmarks")
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported_model(tmp_path_factory, 64)


# ---------------------------------------------------------------------------------- no unpickling


def python_sources() -> list[Path]:
    files = [path for folder in SCANNED for path in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 20, files
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        keyword.arg == name and isinstance(keyword.value, ast.Constant) and keyword.value.value is value
        for keyword in call.keywords
    )


def unpickling_sites(source: str) -> list[str]:
    """Every place in `source` that can unpickle: pickling-module imports, torch.load without
    weights_only=True, np.load with allow_pickle=True, yaml.load, pandas.read_pickle."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            names = []
        problems += [f"line {node.lineno}: imports {name}" for name in names if name in PICKLING_MODULES]
        if not isinstance(node, ast.Call):
            continue
        function = _dotted(node.func)
        if function.endswith("torch.load") and not _keyword_is(node, "weights_only", True):
            problems.append(f"line {node.lineno}: {function} without weights_only=True")
        if function in ("np.load", "numpy.load") and _keyword_is(node, "allow_pickle", True):
            problems.append(f"line {node.lineno}: {function} with allow_pickle=True")
        if function in ("yaml.load", "yaml.unsafe_load", "pd.read_pickle", "pandas.read_pickle"):
            problems.append(f"line {node.lineno}: {function}")
    return problems


def test_the_scanner_finds_every_kind_of_unpickling() -> None:
    bad = (
        "import pickle\nfrom joblib import load\nimport torch\nimport numpy as np\n"
        "torch.load('a.pt')\ntorch.load('a.pt', weights_only=False)\nnp.load('a.npy', allow_pickle=True)\n"
    )
    good = (
        "import torch\nimport numpy as np\n"
        "torch.load('a', weights_only=True)\nnp.load('a', allow_pickle=False)\n"
    )
    assert len(unpickling_sites(bad)) == 5
    assert unpickling_sites(good) == []


def test_no_code_path_unpickles() -> None:
    problems = {
        str(path.relative_to(REPO)): found
        for path in python_sources()
        if (found := unpickling_sites(path.read_text()))
    }
    assert problems == {}


def test_model_files_are_read_as_safetensors_and_onnx_only() -> None:
    checkpoint = (REPO / "training" / "checkpoint.py").read_text()
    teacher = (REPO / "training" / "teacher_file.py").read_text()
    assert "from safetensors" in checkpoint and "load_file(" in checkpoint
    assert "safe_open(" in teacher
    backends = (REPO / "server" / "backends.py").read_text()
    assert "InferenceSession(" in backends and "torch" not in backends.replace("never imports torch", "")


class Payload:
    """Unpickling this creates `marker`: proof that a loader executed code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.marker), "w")


def write_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def _rehash(json_path: Path, keys: list[str], data_path: Path) -> None:
    """Record `data_path`'s sha256 under `keys` in `json_path`, so only the parser can refuse it."""
    document = json.loads(json_path.read_text())
    target = document
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = hashlib.sha256(data_path.read_bytes()).hexdigest()
    json_path.write_text(json.dumps(document))


def test_a_pickle_in_place_of_a_model_file_is_refused_without_running(
    model_dir: Path, tmp_path: Path
) -> None:
    import torch

    from efficientad.model_dir import read_model_dir
    from server.backends import BackendError, OnnxRuntimeBackend
    from training.backbones import BackboneError, read_state_dict
    from training.checkpoint import CheckpointError, load_checkpoint
    from training.teacher_file import load_teacher

    marker = tmp_path / "code-ran"
    # the server's model: model.onnx replaced by a pickle, its hash recorded so the backend must parse it
    served = tmp_path / "model"
    shutil.copytree(model_dir, served)
    write_pickle(served / "model.onnx", marker)
    _rehash(served / "model.json", ["onnx", "sha256"], served / "model.onnx")
    with pytest.raises(BackendError, match="cannot load"):
        OnnxRuntimeBackend(read_model_dir(served))
    # a training checkpoint whose tensors file is a pickle (hash recorded to match)
    run_dir = model_dir.parent / "run-model64"
    forged_run = tmp_path / "run"
    shutil.copytree(run_dir, forged_run)
    write_pickle(forged_run / "checkpoint.safetensors", marker)
    _rehash(forged_run / "checkpoint.json", ["tensors_sha256"], forged_run / "checkpoint.safetensors")
    with pytest.raises(CheckpointError):
        load_checkpoint(forged_run)
    # a teacher file, and torch-format backbone weights (read with weights_only=True)
    write_pickle(tmp_path / "teacher.safetensors", marker)
    with pytest.raises(CheckpointError):
        load_teacher(tmp_path / "teacher.safetensors")
    torch.save({"weights": Payload(marker)}, tmp_path / "backbone.pth")
    with pytest.raises(BackboneError, match="weights_only"):
        read_state_dict(tmp_path / "backbone.pth")
    assert not marker.exists(), "a loader executed code from a pickle"
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload itself does work
    assert marker.exists()


# ----------------------------------------------------------------------------------------- API key


def test_the_api_key_is_compared_with_compare_digest(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key check goes through hmac.compare_digest (constant time), never `==`."""
    from server import deps

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(given: bytes, expected: bytes) -> bool:
        calls.append((given, expected))
        return real(given, expected)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    key = "s3cret-key-0123456789"
    settings = Settings(model_dirs=[model_dir], backend="onnxruntime-cpu", intra_op_threads=1, api_key=key)
    body = png_bytes(np.full((64, 64, 3), 90, np.uint8))
    from server.app import create_app

    with running_server(create_app(settings)) as url, httpx.Client(timeout=60) as http:
        predict = f"{url}/predict?heatmap=none"
        same_length = key[:-1] + ("x" if key[-1] != "x" else "y")
        answers = {
            "right": http.post(predict, content=body, headers={**PNG, "X-API-Key": key}),
            "bearer": http.post(predict, content=body, headers={**PNG, "Authorization": f"Bearer {key}"}),
            "same length": http.post(predict, content=body, headers={**PNG, "X-API-Key": same_length}),
            "prefix": http.post(predict, content=body, headers={**PNG, "X-API-Key": key[:5]}),
            "by name": http.post(
                f"{url}/v1/models/model64/predict", content=body, headers={**PNG, "X-API-Key": "nope"}
            ),
        }
    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses == {"right": 200, "bearer": 200, "same length": 401, "prefix": 401, "by name": 401}
    assert [given for given, _ in calls] == [
        key.encode(),
        key.encode(),
        same_length.encode(),
        b"s3cre",
        b"nope",
    ]
    assert {expected for _, expected in calls} == {key.encode()}
    source = (REPO / "server" / "deps.py").read_text()
    function = next(
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "require_api_key"
    )
    key_names = {"given", "expected", "token", "key"}
    key_equality = [
        ast.unparse(node)
        for node in ast.walk(function)
        if isinstance(node, ast.Compare)
        and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops)
        and key_names & {name.id for name in ast.walk(node) if isinstance(name, ast.Name)}
    ]
    assert key_equality == [], "the key must not be compared with == or !="


@pytest.fixture
def served_with_key(model_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """`efficientad serve` as a subprocess with EAD_API_KEY, DEBUG logs into a file."""
    key = "tok-" + os.urandom(12).hex()
    port = free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "EAD_API_KEY": key, "EAD_LOG_LEVEL": "DEBUG", "EAD_LOG_FORMAT": "json",
           "EAD_INTRA_OP_THREADS": "1"}  # fmt: skip
    command = [sys.executable, "-m", "efficientad", "--log-level", "DEBUG", "serve", str(model_dir),
               "--port", str(port), "--backend", "onnxruntime-cpu"]  # fmt: skip
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "server never became ready"
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, log_path, key
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_no_key_appears_in_the_logs(served_with_key: tuple[str, Path, str]) -> None:
    url, log_path, key = served_with_key
    wrong = "wrong-" + os.urandom(8).hex()
    body = png_bytes(np.full((64, 64, 3), 120, np.uint8))
    with httpx.Client(timeout=60) as http:
        answers = [
            http.post(f"{url}/predict", content=body, headers={**PNG, "X-API-Key": key}),
            http.post(f"{url}/predict", content=body, headers={**PNG, "Authorization": f"Bearer {key}"}),
            http.post(f"{url}/predict", content=body, headers={**PNG, "X-API-Key": wrong}),
            http.post(f"{url}/predict", content=body, headers={**PNG, "Authorization": f"Bearer {wrong}"}),
            http.post(f"{url}/predict", content=b"not an image", headers={**PNG, "X-API-Key": key}),
            http.get(f"{url}/v1/model", headers={"X-API-Key": key}),
            http.get(f"{url}/v1/models", headers={"X-API-Key": wrong}),  # model info needs no key
            http.get(f"{url}/metrics"),
        ]
    assert [answer.status_code for answer in answers] == [200, 200, 401, 401, 400, 200, 200, 200]
    for answer in answers:  # no answer echoes a key either
        assert key not in answer.text and wrong not in answer.text
        assert key not in str(answer.headers) and wrong not in str(answer.headers)
    time.sleep(0.5)  # let the last access lines reach the file
    log = log_path.read_text(errors="replace")
    access = [json.loads(line) for line in log.splitlines() if '"efficientad.access"' in line]
    assert len(access) >= len(answers), log[-2000:]  # the log really was captured
    assert key not in log and wrong not in log
    assert "Bearer" not in log and "x-api-key" not in log.lower()


def test_settings_never_show_the_key() -> None:
    key = "hidden-" + os.urandom(8).hex()
    settings = Settings(model_dirs=[REPO / "samples"], api_key=key)
    assert key not in repr(settings) and key not in str(settings.model_dump())
    assert settings.api_key_bytes() == key.encode()


# -------------------------------------------------------------------------------------------- limits

DOCUMENTED_LIMITS = {  # setting -> what it bounds (the table in docs/reliability.md, "Limits")
    "max_body_bytes": "request body",
    "max_image_pixels": "pixels per image",
    "min_image_side": "smallest image side",
    "max_queue": "images queued per model",
    "max_batch_size": "images per inference call",
    "request_timeout_ms": "deadline per request",
}


def test_limits_are_documented_with_their_defaults() -> None:
    page = (REPO / "docs" / "reliability.md").read_text()
    text = page[page.index("\n## Limits") :]  # the limits table lives in that section
    defaults = Settings.model_fields
    for name in DOCUMENTED_LIMITS:
        default = defaults[name].default
        rows = [line for line in text.splitlines() if line.startswith("|") and f"`{name}`" in line]
        assert rows, f"limit {name} is not in the limits table"
        assert f"`{default}`" in rows[0], f"{name}: default {default} not in {rows[0]!r}"


def test_limits_are_enforced(model_dir: Path) -> None:
    from server.app import create_app

    settings = Settings(
        model_dirs=[model_dir],
        backend="onnxruntime-cpu",
        intra_op_threads=1,
        max_body_bytes=64 * 1024,
        max_image_pixels=200 * 200,
        min_image_side=20,
    )
    assert settings.max_body_bytes < 20 * MIB
    noise = np.random.default_rng(0).integers(0, 256, size=(160, 160, 3), dtype=np.uint8)
    with running_server(create_app(settings)) as url, httpx.Client(timeout=60) as http:
        predict = f"{url}/predict?heatmap=none"
        big_body = http.post(predict, content=png_bytes(noise), headers=PNG)  # ~77 KB > 64 KiB
        many_pixels = http.post(predict, content=png_bytes(np.zeros((201, 200, 3), np.uint8)), headers=PNG)
        too_small = http.post(predict, content=png_bytes(np.zeros((19, 64, 3), np.uint8)), headers=PNG)
        streamed = http.post(predict, content=iter([b"\0" * 40_000] * 2), headers=PNG)  # no Content-Length
        fine = http.post(predict, content=png_bytes(np.zeros((200, 200, 3), np.uint8)), headers=PNG)
    assert (big_body.status_code, big_body.json()["error"]) == (413, "body_too_large")
    assert (many_pixels.status_code, many_pixels.json()["error"]) == (413, "image_too_large")
    assert (too_small.status_code, too_small.json()["error"]) == (400, "image_too_small")
    assert (streamed.status_code, streamed.json()["error"]) == (413, "body_too_large")
    assert fine.status_code == 200
