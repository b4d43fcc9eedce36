"""The HTTP routes: thin handlers that read, check, hand over to the batcher and answer.

HTTP errors are raised here only (as ApiError, turned into `{"error", "detail"}` JSON by the app).
Decoding and PNG encoding run on the decode thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import logging
import math
import mimetypes
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from server.answers import JsonAnswer, dumps, server_timing
from server.batcher import BatcherClosed, DeadlineExceeded, InferenceFailed, QueueFull
from server.config import HeatmapMode, HeatmapSize, HeatmapStyle
from server.heatmap import heatmap_value_range, render_heatmap
from server.imaging import (
    SUPPORTED_CONTENT_TYPES,
    ImageError,
    ImageTooLarge,
    ImageTooSmall,
    UnsupportedImageType,
    decode_for_model,
    normalise_content_type,
)
from server.regions import find_regions
from server.schemas import (
    BatchPrediction,
    ErrorBody,
    Liveness,
    ModelDescription,
    ModelList,
    ModelReload,
    Prediction,
    Readiness,
)

if TYPE_CHECKING:
    from server.app import ServedModel, ServingState
    from server.config import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
PREDICT_QUERY_NAMES = frozenset({"model", "heatmap", "heatmap_style", "heatmap_size", "threshold"})
SNIFFED_CONTENT_TYPES = ("", "application/octet-stream")
MULTIPART = "multipart/form-data"
MAX_FILES_PER_REQUEST = 256
# Work done on the event loop when the server is otherwise idle (see _off_loop_when_busy): a 256x256
# JPEG (~25 KB) decodes in ~0.5 ms here; a 576x768 camera photo (~450 KB, ~12 ms) always goes to a thread.
INLINE_DECODE_MAX_BYTES = 128 * 1024
INLINE_HEATMAP_MAX_PIXELS = 256 * 256

router = APIRouter()


class ApiError(Exception):
    """An HTTP error answer: status, a short code and a message for the client."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


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


def serving_state(request: Request) -> ServingState:
    return request.app.state.serving


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


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "undecodable or too small image, empty or malformed body",
        401: "missing or wrong API key",
        404: "unknown model",
        408: "the body did not arrive within body_timeout_s",
        413: "body or image too large",
        415: "unsupported content type",
        422: "bad query parameter; a reload whose model dir does not load",
        500: "inference failed",
        503: "not ready or queue full (see Retry-After)",
        504: "deadline passed",
    }.items()
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": "the raw image bytes (Content-Type image/...), or multipart/form-data with files",
        "content": {
            **{content_type: _BINARY for content_type in SUPPORTED_CONTENT_TYPES},
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
        },
    }
}
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "one image: Prediction; several: BatchPrediction; `Accept: image/png`: the heatmap",
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        {"$ref": "#/components/schemas/Prediction"},
                        {"$ref": "#/components/schemas/BatchPrediction"},
                    ]
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    **ERROR_RESPONSES,
}


@router.post(
    "/predict",
    summary="Score one or more images with the default model (or ?model=NAME)",
    response_model=Prediction | BatchPrediction,
    responses=PREDICT_RESPONSES,
    openapi_extra=PREDICT_BODY,
    dependencies=[Depends(require_api_key)],
)
async def predict(request: Request, query: Annotated[PredictQuery, Depends(predict_query)]) -> Response:
    return await _predict(request, query.model, query)


@router.post(
    "/v1/models/{name}/predict",
    summary="Score one or more images with the model NAME",
    response_model=Prediction | BatchPrediction,
    responses=PREDICT_RESPONSES,
    openapi_extra=PREDICT_BODY,
    dependencies=[Depends(require_api_key)],
)
async def predict_with_model(
    name: str, request: Request, query: Annotated[PredictQuery, Depends(predict_query)]
) -> Response:
    if query.model is not None and query.model != name:
        raise ApiError(
            422, "invalid_parameter", f"?model={query.model} contradicts the path's model {name!r}"
        )
    return await _predict(request, name, query)


@router.post(
    "/v1/models/{name}/reload",
    response_model=ModelReload,
    responses=ERROR_RESPONSES,
    summary="Re-read the model's dir (new threshold or graph), warm it up and swap it in",
    dependencies=[Depends(require_api_key)],
)
async def reload_model(name: str, request: Request) -> JSONResponse:
    from server.app import ReloadFailed

    state = serving_state(request)
    _served_model(state, name)
    try:
        answer = await state.reload(name)
    except ReloadFailed as error:
        status = 422 if error.bad_model_dir else 500
        raise ApiError(
            status, "reload_failed", f"model {name!r} not reloaded, still serving the old one: {error}"
        ) from None
    return JSONResponse(answer)


@router.get("/health/live", response_model=Liveness, summary="The process is up")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/health/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="Every model is loaded and warmed up",
)
async def ready(request: Request) -> JSONResponse:
    state = serving_state(request)
    stall_after_s = state.settings.request_timeout_ms / 1000
    problems = [
        f"model {name}: {problem}"
        for name, model in state.models.items()
        if (problem := model.batcher.health_problem(stall_after_s=stall_after_s)) is not None
    ]
    if state.ready and not problems:
        return JSONResponse({"status": "ready", "models": list(state.models)})
    return JSONResponse(
        {"status": "not_ready", "models": [], "detail": "; ".join(problems) or state.status_detail},
        status_code=503,
        headers=_retry_after(state),
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state = serving_state(request)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


@router.get(
    "/v1/model", response_model=ModelDescription, responses=ERROR_RESPONSES, summary="The default model"
)
async def default_model(request: Request) -> dict[str, Any]:
    state = serving_state(request)
    return _describe(state, _served_model(state, state.default_model))


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="All served models")
async def all_models(request: Request) -> dict[str, Any]:
    state = serving_state(request)
    _require_ready(state)
    return {
        "default": state.default_model,
        "models": [_describe(state, model) for model in state.models.values()],
    }


def _describe(state: ServingState, model: ServedModel) -> dict[str, Any]:
    info = model.info
    return {
        "name": info.name,
        "version": info.version,
        "input_size": [info.input_width, info.input_height],
        "model_size": info.model_size,
        "threshold": info.threshold,
        "backend": model.backend.name,
        "max_batch_size": model.batcher.max_batch_size,
        "max_batch_delay_ms": model.batcher.max_delay_s * 1000,
        "default": info.name == state.default_model,
    }


def _retry_after(state: ServingState) -> dict[str, str]:
    return {"Retry-After": str(state.settings.retry_after_s)}


def _require_ready(state: ServingState) -> None:
    if not state.ready:
        raise ApiError(
            503, "not_ready", f"the server is not ready ({state.status_detail})", _retry_after(state)
        )


def _served_model(state: ServingState, name: str) -> ServedModel:
    _require_ready(state)
    if name not in state.models:
        raise ApiError(404, "unknown_model", f"no model named {name!r}; served: {', '.join(state.models)}")
    return state.models[name]


async def _predict(request: Request, model_name: str | None, query: PredictQuery) -> Response:
    started = time.perf_counter()
    state = serving_state(request)
    settings = state.settings
    unknown = sorted(set(request.query_params) - PREDICT_QUERY_NAMES)
    if unknown:
        raise ApiError(
            422,
            "invalid_parameter",
            f"unknown query parameter {unknown[0]!r}; known: {', '.join(sorted(PREDICT_QUERY_NAMES))}",
        )
    if query.threshold is not None and not math.isfinite(query.threshold):
        raise ApiError(422, "invalid_parameter", f"threshold must be a finite number, got {query.threshold}")
    name = model_name or state.default_model
    request.state.model = _served_model(state, name).info.name  # 503 not ready, 404 unknown, first
    wants_png = _accepts_png_over_json(request.headers.get("accept"))
    if wants_png and query.heatmap == "none":
        raise ApiError(422, "invalid_parameter", "heatmap=none contradicts Accept: image/png")

    read_started = time.perf_counter()
    images = await _read_images(
        request,
        settings.max_body_bytes,
        max_files=min(MAX_FILES_PER_REQUEST, settings.max_queue),
        timeout_s=settings.body_timeout_s,
    )
    read_ms = (time.perf_counter() - read_started) * 1000
    request.state.images = len(images)
    if wants_png and len(images) != 1:
        raise ApiError(
            422, "invalid_parameter", f"Accept: image/png answers one heatmap; got {len(images)} images"
        )
    deadline = started + settings.request_timeout_ms / 1000
    with state.use(name) as model:  # a reload meanwhile: this request finishes on this model
        options = _RenderOptions(
            heatmap=wants_png or (query.heatmap or settings.heatmap) == "png",
            style=query.heatmap_style or settings.heatmap_style,
            original_size=(query.heatmap_size or settings.heatmap_size) == "original",
            threshold=query.threshold if query.threshold is not None else model.info.threshold,
            value_range=heatmap_value_range(model.info.threshold),
        )
        if len(images) == 1:
            filename, data, content_type = images[0]
            result = await _score(state, model, data, content_type, options, started, deadline, filename)
            _add_read_time(result.document, read_ms)
            stages = _stages(result.document["timings_ms"])
            if wants_png:
                return _png_response(result, model, stages, started)
            return _json_answer(result.document, stages, started)
        results = await _score_all(state, model, images, options, started, deadline)
    documents = []
    for (filename, _, _), result in zip(images, results, strict=True):
        _add_read_time(result.document, read_ms)
        documents.append({"filename": filename, **result.document})
    batch = {"model": model.info.name, "model_version": model.info.version, "results": documents}
    return _json_answer(batch, {"read": read_ms}, started)


def _add_read_time(document: dict[str, Any], read_ms: float) -> None:
    """The request body's read time first in the answer's timings (the other stages follow in order)."""
    document["timings_ms"] = {"read": round(read_ms, 3), **document["timings_ms"]}


def _stages(timings_ms: dict[str, float]) -> dict[str, float]:
    """An answer's timings in pipeline order, named as in Server-Timing (encode is the heatmap)."""
    return {
        "read": timings_ms["read"],
        "decode": timings_ms["decode"],
        "queue": timings_ms["queue"],
        "inference": timings_ms["inference"],
        "heatmap": timings_ms["encode"],
    }


def _json_answer(document: dict[str, Any], stages: dict[str, float], started: float) -> Response:
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


@dataclass(frozen=True)
class _RenderOptions:
    heatmap: bool
    style: str
    original_size: bool
    threshold: float | None
    value_range: tuple[float, float]


@dataclass
class _Scored:
    document: dict[str, Any]
    png: bytes | None


async def _score_all(
    state: ServingState,
    model: ServedModel,
    images: list[tuple[str | None, bytes, str | None]],
    options: _RenderOptions,
    started: float,
    deadline: float,
) -> list[_Scored]:
    """Score every file concurrently (so they share batches); the first failure fails the request."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(
                    _score(state, model, data, content_type, options, started, deadline, filename)
                )
                for filename, data, content_type in images
            ]
    except ExceptionGroup as failures:
        first = failures.exceptions[0]
        while isinstance(first, ExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [task.result() for task in tasks]


def _counts_images_in_flight(score: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """`state.images_in_flight` is one higher while the wrapped coroutine (state first) runs."""

    @functools.wraps(score)
    async def counted(state: ServingState, *args: Any) -> T:
        state.images_in_flight += 1
        try:
            return await score(state, *args)
        finally:
            state.images_in_flight -= 1

    return counted


@_counts_images_in_flight
async def _score(
    state: ServingState,
    model: ServedModel,
    data: bytes,
    content_type: str | None,
    options: _RenderOptions,
    started: float,
    deadline: float,
    label: str | None,
) -> _Scored:
    """Decode -> batcher -> heatmap for one image; ApiError on any failure (label names the file)."""
    settings = state.settings
    info = model.info
    prefix = f"{label}: " if label else ""
    if not data:
        raise ApiError(400, "empty_body", f"{prefix}no image data (the body or file is empty)")
    decode_started = time.perf_counter()
    try:
        pixels, original_size = await _off_loop_when_busy(
            state,
            len(data) <= INLINE_DECODE_MAX_BYTES,
            decode_for_model,
            data,
            content_type=content_type,
            height=info.input_height,
            width=info.input_width,
            max_pixels=settings.max_image_pixels,
            min_side=settings.min_image_side,
        )
    except ImageError as error:
        raise _image_error(error, prefix) from None
    decode_ms = (time.perf_counter() - decode_started) * 1000

    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        raise ApiError(504, "deadline_exceeded", f"{prefix}the request deadline passed while decoding")
    try:
        result = await model.batcher.submit(pixels, timeout_s=remaining)
    except QueueFull as error:
        raise ApiError(503, "queue_full", f"{error}; retry later", _retry_after(state)) from None
    except BatcherClosed as error:
        raise ApiError(503, "not_ready", str(error), _retry_after(state)) from None
    except DeadlineExceeded:
        raise ApiError(
            504,
            "deadline_exceeded",
            f"{prefix}no result within the request deadline of "
            f"{settings.request_timeout_ms:.0f} ms (overloaded: retry later or send fewer images)",
        ) from None
    except InferenceFailed as error:
        raise ApiError(500, "inference_failed", f"{prefix}{error}") from None

    encode_started = time.perf_counter()
    anomaly_map = result.anomaly_map[0]  # (H, W) float32
    heatmap_size = None
    if options.heatmap:
        heatmap_size = original_size if options.original_size else (info.input_width, info.input_height)
        png, regions = await _off_loop_when_busy(
            state,
            heatmap_size[0] * heatmap_size[1] <= INLINE_HEATMAP_MAX_PIXELS,
            _heatmap_and_regions,
            anomaly_map,
            options,
            settings,
            heatmap_size,
            original_size,
            pixels,
        )
    else:
        png, regions = None, _regions(anomaly_map, options, settings, original_size)
    encode_ms = (time.perf_counter() - encode_started) * 1000
    is_anomaly = options.threshold is not None and result.score > options.threshold
    state.metrics.observe_prediction(info.name, result.score, is_anomaly)
    document = {
        "model": info.name,
        "model_version": info.version,
        "score": result.score,
        "is_anomaly": is_anomaly,
        "threshold": options.threshold,
        "heatmap_png": None if png is None else base64.b64encode(png).decode("ascii"),
        "heatmap_size": None if heatmap_size is None else list(heatmap_size),
        "image_size": list(original_size),
        "regions": regions,
        "timings_ms": {
            "decode": round(decode_ms, 3),
            "queue": round(result.queue_s * 1000, 3),
            "inference": round(result.inference_s * 1000, 3),
            "encode": round(encode_ms, 3),
            "total": round((time.perf_counter() - started) * 1000, 3),
        },
    }
    return _Scored(document, png)


def _regions(
    anomaly_map: np.ndarray, options: _RenderOptions, settings: Settings, original_size: tuple[int, int]
) -> list[dict[str, Any]]:
    return find_regions(
        anomaly_map,
        options.threshold,
        image_size=original_size,
        max_regions=settings.max_regions,
        min_area=settings.min_region_area,
    )


def _heatmap_and_regions(
    anomaly_map: np.ndarray,
    options: _RenderOptions,
    settings: Settings,
    heatmap_size: tuple[int, int],
    original_size: tuple[int, int],
    pixels: np.ndarray,
) -> tuple[bytes, list[dict[str, Any]]]:
    """On a decode thread: the heatmap PNG and the regions, one hop off the event loop for both."""
    png = render_heatmap(
        anomaly_map,
        style=options.style,
        value_range=options.value_range,
        size=heatmap_size,
        background=pixels if options.style == "overlay" else None,
    )
    return png, _regions(anomaly_map, options, settings, original_size)


def _png_response(result: _Scored, model: ServedModel, stages: dict[str, float], started: float) -> Response:
    document = result.document
    threshold = document["threshold"]
    headers = {
        "X-Anomaly-Score": repr(document["score"]),
        "X-Is-Anomaly": "true" if document["is_anomaly"] else "false",
        "X-Threshold": "none" if threshold is None else repr(threshold),
        "X-Model": model.info.name,
        "X-Model-Version": model.info.version,
        "X-Regions": str(len(document["regions"])),
        "Server-Timing": server_timing({**stages, "total": (time.perf_counter() - started) * 1000}),
    }
    return Response(result.png, media_type="image/png", headers=headers)


def _image_error(error: ImageError, prefix: str) -> ApiError:
    if isinstance(error, UnsupportedImageType):
        return ApiError(415, "unsupported_media_type", f"{prefix}{error}")
    if isinstance(error, ImageTooLarge):
        return ApiError(413, "image_too_large", f"{prefix}{error}")
    if isinstance(error, ImageTooSmall):
        return ApiError(400, "image_too_small", f"{prefix}{error}")
    return ApiError(400, "undecodable_image", f"{prefix}{error}")


async def _off_loop_when_busy(
    state: ServingState, small: bool, function: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """`function(*args, **kwargs)` on a decode thread, or right here when this is the only image in
    flight and the work is small: a hand-over to a thread and back costs about as much as decoding a
    256x256 JPEG, and with nothing else waiting there is no other core's worth of work to win."""
    if small and state.images_in_flight <= 1:
        return function(*args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(state.decode_executor, functools.partial(function, *args, **kwargs))


def _accepts_png_over_json(accept: str | None) -> bool:
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


async def _read_images(
    request: Request, limit: int, *, max_files: int, timeout_s: float
) -> list[tuple[str | None, bytes, str | None]]:
    """The request's images as (filename, bytes, content type): the raw body or each multipart file."""
    raw_type = request.headers.get("content-type")
    media_type = normalise_content_type(raw_type)
    if (
        media_type != MULTIPART
        and media_type not in SUPPORTED_CONTENT_TYPES
        and media_type not in SNIFFED_CONTENT_TYPES
    ):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"unsupported Content-Type {raw_type!r}: send one of "
            f"{', '.join(SUPPORTED_CONTENT_TYPES)} or {MULTIPART}",
        )
    body = await _read_body(request, limit, timeout_s)
    if media_type != MULTIPART:
        return [(None, body, raw_type)]
    return await _multipart_files(request, body, max_files)


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refusing (413) by Content-Length before reading, and again while streaming.

    A body that has not all arrived within `timeout_s` is refused (408) and its connection closed: a
    client that stops sending mid-body holds nothing for longer than that. A client that disconnects
    mid-body is logged at INFO (it is the client's doing, not a server error) and answered 499, which
    only the access log and the metrics see.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise ApiError(413, "body_too_large", f"the body is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "body_too_large", f"the body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408,
            "body_timeout",
            f"the body did not arrive within {timeout_s:g} s ({size} bytes came); the connection is closed",
            {"Connection": "close"},
        ) from None
    except ClientDisconnect:
        logger.info("client disconnected during the upload, after %d bytes of the body", size)
        raise ApiError(499, "client_disconnected", "the client disconnected during the upload") from None
    return b"".join(chunks)


async def _multipart_files(
    request: Request, body: bytes, max_files: int
) -> list[tuple[str | None, bytes, str | None]]:
    """Every file part (any field name) as (filename, bytes, content type); text fields are ignored."""

    async def replay() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(
        request.headers, replay(), max_files=max_files, max_fields=100, max_part_size=1 << 20
    )
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {error.message}") from None
    try:
        files = []
        for field_name, value in form.multi_items():
            if isinstance(value, UploadFile):
                filename = value.filename or field_name
                files.append((filename, await value.read(), _part_content_type(value)))
    finally:
        await form.close()
    if not files:
        raise ApiError(400, "empty_body", "the multipart body has no file parts")
    return files


def _part_content_type(upload: UploadFile) -> str | None:
    """The part's Content-Type, or one guessed from its file name when the part says nothing useful."""
    declared = normalise_content_type(upload.content_type)
    if declared and declared not in SNIFFED_CONTENT_TYPES:
        return upload.content_type
    guessed = mimetypes.guess_type(upload.filename or "")[0]
    return guessed or None
