"""What the route handlers share: the serving state, the API key check, the predict query parameters."""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass
from typing import Annotated

from fastapi import Query, Request

from server.config import HeatmapMode, HeatmapSize, HeatmapStyle
from server.errors import ApiError
from server.scoring import retry_after
from server.state import ServedModel, ServingState

PREDICT_QUERY_NAMES = frozenset({"model", "heatmap", "heatmap_style", "heatmap_size", "threshold"})


@dataclass(frozen=True)
class PredictQuery:
    model: str | None
    heatmap: HeatmapMode | None
    heatmap_style: HeatmapStyle | None
    heatmap_size: HeatmapSize | None
    threshold: float | None


async def predict_query(  # async: FastAPI runs a plain `def` dependency in a thread, a hop per request
    model: Annotated[
        str | None, Query(description="model name (default: the server's default model)")
    ] = None,
    heatmap: Annotated[
        HeatmapMode | None, Query(description="png: include the heatmap; none: score only")
    ] = None,
    heatmap_style: Annotated[
        HeatmapStyle | None, Query(description="gray, jet or overlay (jet over the image)")
    ] = None,
    heatmap_size: Annotated[
        HeatmapSize | None, Query(description="model input size or original image size")
    ] = None,
    threshold: Annotated[
        float | None, Query(description="override the model's threshold for is_anomaly")
    ] = None,
) -> PredictQuery:
    return PredictQuery(model, heatmap, heatmap_style, heatmap_size, threshold)


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
