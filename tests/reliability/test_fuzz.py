"""Fuzzing, bounded for CI: the HTTP API from its own OpenAPI document (schemathesis), and the image
decode + preprocess path `server.imaging.decode_for_model` (hypothesis byte mutations, atheris).

Longer runs: `make fuzz FUZZ_SECONDS=1800` (atheris) and `EAD_FUZZ_EXAMPLES=500 pytest tests/reliability`.
Every crash a fuzzer finds goes into tests/reliability/fuzz_regressions/ and is replayed here for good.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("hypothesis")  # installed with schemathesis

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from server.config import Settings
from tests.reliability import FUZZ_REGRESSIONS, exported_model
from tests.server.conftest import running_server

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "fuzz" / "fuzz_imaging.py"
EXAMPLES = int(os.environ.get("EAD_FUZZ_EXAMPLES", "25"))  # per API operation and mode
BYTE_EXAMPLES = int(os.environ.get("EAD_FUZZ_BYTE_EXAMPLES", "400"))
ATHERIS_RUNS = int(os.environ.get("EAD_FUZZ_ATHERIS_RUNS", "10000"))
FUZZ_RSS_BUDGET_MB = 2048  # what the fuzzing child may use beyond the peak it inherits


def load_harness() -> ModuleType:
    """fuzz/fuzz_imaging.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("fuzz_imaging", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = load_harness()
SEEDS = harness.seed_inputs()


# ------------------------------------------------------------------------------- the HTTP API


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from server.app import create_app

    settings = Settings(
        model_dirs=[exported_model(tmp_path_factory, 64)],
        backend="onnxruntime-cpu",
        intra_op_threads=1,
        max_body_bytes=256 * 1024,  # keeps generated bodies cheap; the limit's own path is fuzzed too
    )
    with running_server(create_app(settings)) as url:
        yield url


def api_operations(url: str) -> list[Any]:
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_every_route_answers_without_5xx_and_as_documented(live_server: str) -> None:
    """Property-based requests to every operation in /openapi.json, valid (positive) and invalid
    (negative) ones: never a 5xx, every status and body as the schema documents, invalid input refused."""
    pytest.importorskip("schemathesis")
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    operations = api_operations(live_server)
    labels = {operation.label for operation in operations}
    assert {"POST /predict", "GET /health/ready", "GET /v1/model", "GET /metrics"} <= labels
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        fuzz_operation(live_server, operation, GenerationMode.POSITIVE, checks, statuses)
        fuzz_operation(live_server, operation, GenerationMode.NEGATIVE, [*checks, negative_data_rejection],
                       statuses)  # fmt: skip
        if operation.label == "POST /v1/models/{name}/predict":  # the served model, so bodies get decoded
            named: dict[str, set[int]] = {}
            fuzz_operation(live_server, operation, GenerationMode.POSITIVE, checks, named,
                           path_parameters={"name": "model64"})  # fmt: skip
            assert named[operation.label] - {404}, named
    assert statuses.keys() == labels
    assert not any(status >= 500 for seen in statuses.values() for status in seen), statuses
    # random bodies as images: refused with the documented 4xx codes, never accepted blindly
    assert statuses["POST /predict"] & {400, 413, 415, 422}


def fuzz_operation(
    url: str, operation: Any, mode: Any, checks: list[Any], statuses: dict[str, set[int]], **fixed: Any
) -> None:
    """EXAMPLES generated requests to one operation; each response validated by `checks`."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    def check(case: Any) -> None:
        response = case.call(base_url=url, timeout=60)
        statuses.setdefault(case.operation.label, set()).add(response.status_code)
        case.validate_response(response, checks=checks)

    try:
        check()
    except (
        Unsatisfiable
    ):  # negative mode where nothing can be invalid: no inputs, or free-text path names only
        free_text_path = all(
            parameter.definition.get("schema", {}).get("type") == "string"
            for parameter in operation.path_parameters
        )
        assert mode.name == "NEGATIVE" and free_text_path and not operation.query, operation.label


# ------------------------------------------------------------------- image decode + preprocess


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid seed image (with its content-type selector byte), then byte edits: overwrite runs,
    inserts, deletions and a truncation. Mostly keeps the header parseable, so decoders go deep."""
    data = bytearray(draw(st.sampled_from(sorted(SEEDS.items())))[1])
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(1, max(1, len(data) - 1)))
        edit = draw(st.sampled_from(["overwrite", "insert", "delete"]))
        chunk = draw(st.binary(min_size=1, max_size=8))
        if edit == "overwrite":
            data[position : position + len(chunk)] = chunk
        elif edit == "insert":
            data[position:position] = chunk
        else:
            del data[position : position + len(chunk)]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt TIFF/EXIF it reads
@settings(max_examples=BYTE_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(mutated_images(), st.binary(max_size=2048)))
def test_decode_for_model_refuses_or_returns_model_pixels(data: bytes) -> None:
    harness.check_one_input(data)


def test_every_seed_decodes_or_is_refused_for_its_format() -> None:
    """The fuzz seeds themselves: every supported kind decodes; GIF is refused as unsupported."""
    from server.imaging import UnsupportedImageType, decode_for_model

    for name, data in SEEDS.items():
        content_type, body = harness.split_input(data)
        if name.startswith("gif"):
            with pytest.raises(UnsupportedImageType):
                decode_for_model(body, content_type=content_type, height=64, width=64, max_pixels=10**6)
            continue
        pixels, size = decode_for_model(
            body, content_type=content_type, height=64, width=64, max_pixels=10**6
        )
        assert pixels.shape == (3, 64, 64)
        assert size == ((24, 32) if name == "jpeg-exif-rotated" else (32, 24)), name


REGRESSIONS = sorted(
    path for path in FUZZ_REGRESSIONS.glob("*") if path.is_file() and path.name != "README.md"
)


@pytest.mark.parametrize("path", REGRESSIONS, ids=[path.name for path in REGRESSIONS])
def test_fuzz_regression_inputs_are_handled(path: Path) -> None:
    harness.check_one_input(path.read_bytes())


def test_atheris_coverage_guided_run(tmp_path: Path) -> None:
    """A bounded libFuzzer run from the seeds; a finding makes it exit non-zero with the traceback."""
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    harness.write_seeds(corpus)
    for path in REGRESSIONS:
        shutil.copy(path, corpus / path.name)
    # libFuzzer's RSS check reads the process's peak RSS (getrusage), and Linux carries this pytest
    # process's peak (over 2 GB after the torch tests) across spawn + exec: the child would "run out of
    # memory" before its first input. The limit is 2 GB on top of what it inherits.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # ru_maxrss: KiB on Linux
    limits = [f"-rss_limit_mb={FUZZ_RSS_BUDGET_MB + inherited_mb}", f"-malloc_limit_mb={FUZZ_RSS_BUDGET_MB}"]
    # a fixed seed keeps CI reproducible; longer unseeded runs: `make fuzz` (docs/reliability.md, "Fuzzing")
    command = [sys.executable, str(HARNESS), str(corpus), f"-runs={ATHERIS_RUNS}", "-seed=1",
               "-max_len=65536", "-max_total_time=120", f"-artifact_prefix={tmp_path}/", *limits]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done" in result.stderr, result.stderr[-2000:]
    assert not list(tmp_path.glob("crash-*"))
