"""Answer bodies and the Server-Timing header: JSON through orjson (a tenth of the time of the standard
library on an answer carrying a base64 heatmap), the standard library where orjson is not installed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

try:
    import orjson
except ModuleNotFoundError:  # optional: the standard library gives the same JSON, more slowly
    orjson = None

JSON_MEDIA_TYPE = "application/json"


def dumps(document: Any) -> bytes:
    """Compact UTF-8 JSON; non-finite floats are refused (ValueError), as Starlette's JSONResponse does."""
    if orjson is not None:
        _refuse_non_finite(document)
        return orjson.dumps(document)  # type: ignore[no-any-return]
    return json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _refuse_non_finite(value: Any) -> None:
    """orjson writes NaN and infinity as null; a score must never silently become null."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"a non-finite number ({value}) cannot go into a JSON answer")
    elif isinstance(value, Mapping):
        for item in value.values():
            _refuse_non_finite(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _refuse_non_finite(item)


def server_timing(stages_ms: Mapping[str, float]) -> str:
    """{"decode": 0.41, "queue": 0.02} -> 'decode;dur=0.41, queue;dur=0.02' (the W3C Server-Timing header)."""
    return ", ".join(f"{stage};dur={milliseconds:.3f}" for stage, milliseconds in stages_ms.items())


class JsonAnswer(Response):
    """A JSON answer from bytes already made (so the time spent making them can go into its headers)."""

    media_type = JSON_MEDIA_TYPE

    def __init__(
        self, body: bytes, *, status_code: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(body, status_code=status_code, headers=headers)
