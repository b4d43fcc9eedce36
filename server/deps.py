"""What the route handlers share: the serving state, the API key check, the predict query parameters."""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass
from typing import Any, get_args

from starlette.requests import Request

from server.config import HeatmapMode, HeatmapSize, HeatmapStyle
from server.errors import ApiError
from server.scoring import retry_after
from server.state import ServedModel, ServingState

# The predict routes' query parameters: name -> (its allowed values, None for any text; description).
# Parsed by hand from the query string: FastAPI's dependency machinery costs each request about 0.1 ms,
# and a burst of stalled uploads pays that a thousand times over before the first body byte is awaited.
_CHOICES: dict[str, tuple[tuple[str, ...] | None, str]] = {
    "model": (None, "model name (default: the server's default model)"),
    "heatmap": (get_args(HeatmapMode), "png: include the heatmap; none: score only"),
    "heatmap_style": (get_args(HeatmapStyle), "gray, jet or overlay (jet over the image)"),
    "heatmap_size": (get_args(HeatmapSize), "model input size or original image size"),
}
PREDICT_QUERY_NAMES = frozenset({*_CHOICES, "threshold"})
PREDICT_QUERY_OPENAPI: list[dict[str, Any]] = [
    *(
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": description,
            "schema": {"type": "string", **({"enum": list(values)} if values else {})},
        }
        for name, (values, description) in _CHOICES.items()
    ),
    {
        "name": "threshold",
        "in": "query",
        "required": False,
        "description": "override the model's threshold for is_anomaly",
        "schema": {"type": "number"},
    },
]


@dataclass(frozen=True)
class PredictQuery:
    model: str | None
    heatmap: HeatmapMode | None
    heatmap_style: HeatmapStyle | None
    heatmap_size: HeatmapSize | None
    threshold: float | None


def predict_query(request: Request) -> PredictQuery:
    """The predict routes' query parameters; 422 for a value outside its choices or a threshold that is
    not a number (check_predict_query then refuses unknown names and non-finite thresholds)."""
    params = request.query_params
    values: dict[str, Any] = {}
    for name, (choices, _) in _CHOICES.items():
        value = values[name] = params.get(name)
        if value is not None and choices is not None and value not in choices:
            allowed = " or ".join(repr(choice) for choice in choices)
            raise ApiError(422, "invalid_parameter", f"{name}: Input should be {allowed} (got {value!r})")
    threshold = params.get("threshold")
    try:
        values["threshold"] = None if threshold is None else float(threshold)
    except ValueError:
        raise ApiError(
            422, "invalid_parameter", f"threshold: Input should be a valid number (got {threshold!r})"
        ) from None
    return PredictQuery(**values)


def check_predict_query(request: Request, query: PredictQuery) -> None:
    """422 for a query parameter the predict routes do not know, or a threshold that is not finite."""
    unknown = sorted(set(request.query_params) - PREDICT_QUERY_NAMES)
    if unknown:
        raise ApiError(
            422,
            "invalid_parameter",
            f"unknown query parameter {unknown[0]!r}; known: {', '.join(sorted(PREDICT_QUERY_NAMES))}",
        )
    if query.threshold is not None and not math.isfinite(query.threshold):
        raise ApiError(422, "invalid_parameter", f"threshold must be a finite number, got {query.threshold}")


def serving_state(request: Request) -> ServingState:
    return request.app.state.serving  # type: ignore[no-any-return]


async def require_api_key(request: Request) -> None:
    """401 unless the configured key came as `X-API-Key` or `Authorization: Bearer`; no key: open."""
    expected = serving_state(request).settings.api_key_bytes()
    if expected is None:
        return
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" and token.strip() else None
    challenge = {"WWW-Authenticate": "Bearer"}
    if given is None:
        raise ApiError(
            401,
            "unauthorized",
            "missing API key: send X-API-Key: <key> or Authorization: Bearer <key>",
            challenge,
        )
    if not hmac.compare_digest(given.encode(), expected):
        raise ApiError(401, "unauthorized", "wrong API key", challenge)


def require_ready(state: ServingState) -> None:
    """503 (with Retry-After) until every model is loaded and warmed up."""
    if not state.ready:
        raise ApiError(
            503, "not_ready", f"the server is not ready ({state.status_detail})", retry_after(state.settings)
        )


def served_model(state: ServingState, name: str) -> ServedModel:
    """The model served as `name`: 503 when not ready, 404 when there is none of that name."""
    require_ready(state)
    if name not in state.models:
        raise ApiError(404, "unknown_model", f"no model named {name!r}; served: {', '.join(state.models)}")
    return state.models[name]
