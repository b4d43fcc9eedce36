"""Answer bodies: JSON through orjson (a tenth of the time of the standard library on an answer carrying a
base64 heatmap), the heatmap PNG itself for `Accept: image/png`, and the Server-Timing header.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response

JSON_MEDIA_TYPE = "application/json"


def dumps(document: Any) -> bytes:
    """Compact UTF-8 JSON; non-finite floats are refused (ValueError), as Starlette's JSONResponse does."""
    _refuse_non_finite(document)
    return orjson.dumps(document)


_LEAVES = frozenset({str, int, bool, type(None), bytes})


def _refuse_non_finite(value: Any) -> None:
    """orjson writes NaN and infinity as null; a score must never silently become null. (Exact types
    first: an answer is plain dicts, lists, strings and numbers, and isinstance against Mapping is slow.)"""
    kind = type(value)
    if kind in _LEAVES:
        return
    if kind is dict:
        for item in value.values():
            _refuse_non_finite(item)
    elif kind is list or kind is tuple:
        for item in value:
            _refuse_non_finite(item)
    elif isinstance(value, float):
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


def json_answer(document: dict[str, Any], stages: dict[str, float], started: float) -> Response:
    """The document as JSON, with Server-Timing: the stages, the JSON encoding and the total so far."""
    encode_started = time.perf_counter()
    body = dumps(document)
    finished = time.perf_counter()
    timing = {
        **stages,
        "json": (finished - encode_started) * 1000,
        "total": (finished - started) * 1000,
    }
    return JsonAnswer(body, headers={"Server-Timing": server_timing(timing)})


def png_answer(png: bytes, document: dict[str, Any], stages: dict[str, float], started: float) -> Response:
    """The heatmap PNG itself; the score, verdict, threshold, model and region count in headers."""
    threshold = document["threshold"]
    headers = {
        "X-Anomaly-Score": repr(document["score"]),
        "X-Is-Anomaly": "true" if document["is_anomaly"] else "false",
        "X-Threshold": "none" if threshold is None else repr(threshold),
        "X-Model": document["model"],
        "X-Model-Version": document["model_version"],
        "X-Regions": str(len(document["regions"])),
        "Server-Timing": server_timing({**stages, "total": (time.perf_counter() - started) * 1000}),
    }
    return Response(png, media_type="image/png", headers=headers)


def accepts_png_over_json(accept: str | None) -> bool:
    """True when Accept names image/png with a higher (or equal, listed first) preference than JSON."""
    if not accept:
        return False
    weights: dict[str, tuple[float, int]] = {}
    for position, part in enumerate(accept.split(",")):
        media_type, *parameters = (piece.strip() for piece in part.split(";"))
        weight = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        weights.setdefault(media_type.lower(), (weight, position))
    png_weight, png_position = weights.get("image/png", (0.0, 0))
    json_weight, json_position = weights.get("application/json", (0.0, 0))
    if png_weight <= 0:
        return False
    return png_weight > json_weight or (png_weight == json_weight and png_position < json_position)
