"""The benchmark report's schema (version 1) as pydantic models: what each section and row must carry.

Strict types (a boolean is not a number, a string is not a number); other fields are allowed (rows
carry more than the schema names). Optional sections (training_speed: older reports lack it;
server_overhead: absent when not run) are checked when present. `report_problems` words each departure
as `where: what` (e.g. `backends[0].p50_ms: missing`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

SCHEMA_VERSION = 1
Number = float  # strict: int or float, never bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class Device(_Strict):
    kind: str
    name: str


class ModelInfo(_Strict):
    dir: str
    size: str
    input_height: int
    input_width: int
    weights: str


class BackendRow(_Strict):
    name: str
    precision: str
    device: str
    batch_size: int
    p50_ms: Number
    p90_ms: Number
    p99_ms: Number
    images_per_s: Number
    includes_transfer: bool | None


class StageRow(_Strict):
    input_size: str
    stage: str
    p50_ms: Number
    p90_ms: Number | None
    p99_ms: Number | None


class HttpRow(_Strict):
    mode: str
    concurrency: int | None
    rate: Number | None
    p50_ms: Number | None
    p95_ms: Number | None
    p99_ms: Number | None
    throughput_rps: Number
    mean_batch_size: Number | None
    errors: dict[str, Any]


class Derived(_Strict):
    http_c32_over_c1: Number | None
    server_overhead_ms: Number | None


class TrainingRow(_Strict):
    stage: str
    device: str
    precision: str
    image_size: int
    crop: int | None
    batch_size: int
    median_s: Number
    p90_s: Number
    steps_per_s: Number
    images_per_s: Number
    steps: int
    warmup: int
    gflop_per_step: Number | None = None  # FlopCounterMode over one step (reports from 2026-12-02 on)
    gflop_per_s: Number | None = None


class TrainingSpeed(_Strict):
    device: str
    rows: list[TrainingRow]
    notes: list[Any]


class OverheadRow(_Strict):
    target: str
    image: str | None
    heatmap: str | None
    concurrency: int
    p50_ms: Number | None
    p99_ms: Number | None
    throughput_rps: Number
    live_ratio: Number | None
    stages_p50_ms: dict[str, Any]
    errors: dict[str, Any]


class ServerOverhead(_Strict):
    client: str
    server_workers: int
    duration_s: Number
    rows: list[OverheadRow]
    targets: list[Any]


class Report(_Strict):
    schema_version: int
    created: str
    device: Device
    host: dict[str, Any]
    versions: dict[str, Any]
    model: ModelInfo
    settings: dict[str, Any]
    backends: list[BackendRow]
    stages: list[StageRow]
    http: list[HttpRow]
    derived: Derived
    notes: list[Any]
    training_speed: TrainingSpeed | None = None
    server_overhead: ServerOverhead | None = None


_EXPECTED = {
    "int_type": "a number",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "a boolean",
    "dict_type": "an object",
    "list_type": "a list",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _where(location: tuple[Any, ...]) -> str:
    """('backends', 0, 'p50_ms') -> 'backends[0].p50_ms'; a top-level key -> 'report.<key>'."""
    location = tuple(part for part in location if not (isinstance(part, str) and "[" in part))  # unions
    if len(location) == 1:
        return f"report.{location[0]}"
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def report_problems(report: Any) -> list[str]:
    """Every way `report` departs from schema version 1 ([] when it conforms)."""
    try:
        Report.model_validate(report)
    except ValidationError as error:
        problems = []
        for problem in error.errors():
            where = _where(problem["loc"]) if problem["loc"] else "report"
            if problem["type"] == "missing":
                problems.append(f"{where}: missing")
            else:
                got = "a boolean" if isinstance(problem["input"], bool) else type(problem["input"]).__name__
                expected = _EXPECTED.get(problem["type"], problem["msg"])
                problems.append(f"{where}: expected {expected}, got {got}")
        return list(dict.fromkeys(problems))
    if report["schema_version"] != SCHEMA_VERSION:
        return [f"report.schema_version: expected {SCHEMA_VERSION}, got {report['schema_version']}"]
    return []
