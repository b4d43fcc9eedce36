"""The server's settings: one pydantic-settings class, read from keyword arguments or `EAD_*` variables.

`EAD_MODEL_DIRS` is a comma-separated list; each entry is `PATH` (the model is named after its folder) or
`NAME=PATH`. The first model is the default unless `EAD_DEFAULT_MODEL` names another.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BackendKind = Literal["auto", "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"]
HeatmapMode = Literal["png", "none"]
HeatmapStyle = Literal["gray", "jet", "overlay"]
HeatmapSize = Literal["model", "original"]
LogFormat = Literal["json", "text"]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MIB = 1024 * 1024


def split_model_entry(entry: str | os.PathLike[str]) -> tuple[str | None, Path]:
    """'NAME=PATH' -> (NAME, PATH); 'PATH' or a Path -> (None, PATH)."""
    if isinstance(entry, os.PathLike):
        return None, Path(entry)
    name, separator, path = str(entry).strip().partition("=")
    if separator and name and "/" not in name and os.sep not in name:
        return name.strip(), Path(path.strip())
    return None, Path(str(entry).strip())


def usable_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything the server can be told; each field is also the environment variable `EAD_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="EAD_", extra="forbid", validate_default=True)

    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="model directories to serve (PATH or NAME=PATH, comma-separated)"
    )
    model_names: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="names for model_dirs, in order (filled from NAME=PATH entries)"
    )
    default_model: str | None = Field(
        None, description="model for /predict without ?model= (default: the first)"
    )
    backend: BackendKind = Field("auto", description="inference backend")
    max_batch_size: int = Field(16, description="most images run in one inference call")
    max_batch_delay_ms: float = Field(
        0.0,
        allow_inf_nan=False,
        description="optional bound: with a part-full batch and the backend free, wait at most this long "
        "after its oldest request for more (0 = never wait: run what is queued at once)",
    )
    max_queue: int = Field(256, description="images waiting per model before 503 queue full")
    request_timeout_ms: float = Field(10_000, description="deadline per request; past it the answer is 504")
    max_body_bytes: int = Field(20 * MIB, description="largest request body (413 above)")
    body_timeout_s: float = Field(
        10.0, description="longest a request body may take to arrive (408 and the connection closed)"
    )
    max_connections: int = Field(
        1024,
        description="open connections plus requests in progress before new requests get a fast 503 "
        "(uvicorn's limit_concurrency; 0 = no cap)",
    )
    max_image_pixels: int = Field(
        40_000_000, description="largest image in pixels, read from its header (413)"
    )
    min_image_side: int = Field(16, description="smallest allowed image side in px (400 below)")
    max_regions: int = Field(16, description="most defect regions per answer (largest max_score first)")
    min_region_area: float = Field(
        0.0, description="regions smaller than this many original-image pixels are left out"
    )
    heatmap: HeatmapMode = Field("png", description="default for ?heatmap=")
    heatmap_style: HeatmapStyle = Field("jet", description="default for ?heatmap_style=")
    heatmap_size: HeatmapSize = Field("model", description="default for ?heatmap_size=")
    api_key: SecretStr | None = Field(
        None,
        description="if set, the predict routes need it (X-API-Key or Bearer); health, metrics, "
        "model info and the operator page stay open for probes",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="TCP port")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")
    log_format: LogFormat = Field("json", description="json (one object per line) or text")
    intra_op_threads: int = Field(
        0, description="ONNX Runtime CPU threads per model (0 = one per usable core)"
    )
    intra_op_spinning: bool = Field(
        False,
        description="ONNX Runtime CPU threads spin while waiting for work: a little less latency, but "
        "the waiting threads burn the cores the server's own work needs (off by default)",
    )
    decode_threads: int = Field(
        0, description="threads decoding and encoding images (0 = one per usable core)"
    )
    graceful_shutdown_s: float = Field(30.0, description="how long SIGTERM waits for in-flight requests")
    retry_after_s: int = Field(1, description="Retry-After seconds sent with 503")

    @model_validator(mode="before")
    @classmethod
    def _split_named_entries(cls, data: Any) -> Any:
        """`NAME=PATH` entries in model_dirs -> the path in model_dirs and the name in model_names."""
        if not isinstance(data, dict) or "model_dirs" not in data:
            return data
        entries = _comma_list(data["model_dirs"])
        if isinstance(entries, (str, os.PathLike)):
            entries = [entries]
        if not isinstance(entries, (list, tuple)):
            return data
        split = [split_model_entry(entry) for entry in entries]
        data = dict(data)
        data["model_dirs"] = [path for _, path in split]
        if any(name for name, _ in split) and not data.get("model_names"):
            data["model_names"] = [name or path.resolve().name for name, path in split]
        return data

    @field_validator("model_dirs", "model_names", mode="before")
    @classmethod
    def _parse_comma_list(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("model_dirs")
    @classmethod
    def _model_dirs_exist(cls, paths: list[Path]) -> list[Path]:
        missing = [str(path) for path in paths if not path.is_dir()]
        if missing:
            raise ValueError(f"model directory not found: {', '.join(missing)}")
        return paths

    @field_validator("max_batch_size", "max_queue", "max_body_bytes", "max_image_pixels", "min_image_side")
    @classmethod
    def _positive_int(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    @field_validator("request_timeout_ms", "graceful_shutdown_s", "body_timeout_s")
    @classmethod
    def _positive_float(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"must be greater than 0, got {value}")
        return value

    @field_validator(
        "max_batch_delay_ms",
        "intra_op_threads",
        "decode_threads",
        "retry_after_s",
        "max_connections",
        "max_regions",
        "min_region_area",
    )
    @classmethod
    def _not_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value

    @field_validator("port")
    @classmethod
    def _valid_port(cls, value: int) -> int:
        if not 0 <= value <= 65535:
            raise ValueError(f"must be a TCP port 0..65535, got {value}")
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if value in ("", None) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_log_level(cls, value: Any) -> str:
        level = str(value).upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return level

    @model_validator(mode="after")
    def _names_match_models(self) -> Settings:
        if not self.model_dirs:
            raise ValueError("no model directory given: set model_dirs (EAD_MODEL_DIRS=PATH[,NAME=PATH...])")
        if self.model_names and len(self.model_names) != len(self.model_dirs):
            raise ValueError(
                f"model_names has {len(self.model_names)} names for {len(self.model_dirs)} model directories"
            )
        names = self.names()
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"two models share the name {duplicates[0]!r}: name them with NAME=PATH")
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(
                f"default_model {self.default_model!r} is not one of the models: {', '.join(names)}"
            )
        return self

    def names(self) -> list[str]:
        """The serving name of each model dir, in order (its NAME= or its folder name)."""
        return self.model_names or [path.resolve().name for path in self.model_dirs]

    def models(self) -> list[tuple[str, Path]]:
        """(name, model dir) per model, in order."""
        return list(zip(self.names(), self.model_dirs, strict=True))

    def default_model_name(self) -> str:
        return self.default_model or self.names()[0]

    def to_environment(self) -> dict[str, str]:
        """These settings as EAD_* variables (for worker processes that build their own Settings())."""
        environment = {}
        for key, value in self.model_dump(exclude={"model_dirs", "model_names", "api_key"}).items():
            if value is not None:
                environment[f"EAD_{key.upper()}"] = str(value)
        environment["EAD_MODEL_DIRS"] = ",".join(f"{name}={path}" for name, path in self.models())
        if self.api_key is not None:
            environment["EAD_API_KEY"] = self.api_key.get_secret_value()
        return environment

    def api_key_bytes(self) -> bytes | None:
        return None if self.api_key is None else self.api_key.get_secret_value().encode()
