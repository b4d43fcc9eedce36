"""The HTTP routes: thin handlers that check the request, hand the work over and choose the answer.

HTTP errors are raised as ApiError (server.errors turns them into `{"error", "detail"}` JSON). The
images are read by server.uploads and scored by server.scoring; the serving state is server.state.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.answers import JsonAnswer, accepts_png_over_json, json_answer, png_answer
from server.deps import (
    PREDICT_QUERY_OPENAPI,
    PredictQuery,
    check_predict_query,
    predict_query,
    require_api_key,
    require_ready,
    served_model,
    serving_state,
)
from server.errors import ApiError
from server.heatmap import heatmap_value_range
from server.schemas import (
    ERROR_RESPONSES,
    PREDICT_BODY,
    PREDICT_RESPONSES,
    BatchPrediction,
    Liveness,
    ModelDescription,
    ModelList,
    ModelReload,
    Prediction,
    Readiness,
)
from server.scoring import RenderOptions, add_read_time, retry_after, score_images, stages
from server.state import ReloadFailed, ServedModel, ServingState
from server.uploads import MAX_FILES_PER_REQUEST, read_images

router = APIRouter()
# the predict routes read their query by hand (server.deps.predict_query); /docs still lists it
PREDICT_OPENAPI = {**PREDICT_BODY, "parameters": PREDICT_QUERY_OPENAPI}


@router.post(
    "/predict",
    summary="Score one or more images with the default model (or ?model=NAME)",
    response_model=Prediction | BatchPrediction,
    responses=PREDICT_RESPONSES,
    openapi_extra=PREDICT_OPENAPI,
)
async def predict(request: Request) -> Response:
    await require_api_key(request)
    query = predict_query(request)
    return await _predict(request, query.model, query)


@router.post(
    "/v1/models/{name}/predict",
    summary="Score one or more images with the model NAME",
    response_model=Prediction | BatchPrediction,
    responses=PREDICT_RESPONSES,
    openapi_extra=PREDICT_OPENAPI,
)
async def predict_with_model(name: str, request: Request) -> Response:
    await require_api_key(request)
    query = predict_query(request)
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
)
async def reload_model(name: str, request: Request) -> JSONResponse:
    await require_api_key(request)
    state = serving_state(request)
    served_model(state, name)
    try:
        answer = await state.reload(name)
    except ReloadFailed as error:
        status = 422 if error.bad_model_dir else 500
        raise ApiError(
            status, "reload_failed", f"model {name!r} not reloaded, still serving the old one: {error}"
        ) from None
    return JSONResponse(answer)


ALIVE = b'{"status":"alive"}'


@router.get("/health/live", response_model=Liveness, summary="The process is up")
async def live() -> Response:
    return JsonAnswer(ALIVE)  # bytes made once: a probe costs no serialisation


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
        headers=retry_after(state.settings),
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
    return _describe(state, served_model(state, state.default_model))


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="All served models")
async def all_models(request: Request) -> dict[str, Any]:
    state = serving_state(request)
    require_ready(state)
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


async def _predict(request: Request, model_name: str | None, query: PredictQuery) -> Response:
    started = time.perf_counter()
    state = serving_state(request)
    settings = state.settings
    check_predict_query(request, query)
    name = model_name or state.default_model
    request.state.model = served_model(state, name).info.name  # 503 not ready, 404 unknown, first
    wants_png = accepts_png_over_json(request.headers.get("accept"))
    if wants_png and query.heatmap == "none":
        raise ApiError(422, "invalid_parameter", "heatmap=none contradicts Accept: image/png")

    read_started = time.perf_counter()
    images = await read_images(
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
        options = RenderOptions(
            heatmap=wants_png or (query.heatmap or settings.heatmap) == "png",
            style=query.heatmap_style or settings.heatmap_style,
            original_size=(query.heatmap_size or settings.heatmap_size) == "original",
            threshold=query.threshold if query.threshold is not None else model.info.threshold,
            value_range=heatmap_value_range(model.info.threshold),
        )
        results = await score_images(state, model, images, options, started, deadline)
    for result in results:
        add_read_time(result.document, read_ms)
    if len(images) == 1:  # one image (the raw body, or one file): its answer alone
        (result,) = results
        timings = stages(result.document["timings_ms"])
        if wants_png and result.png is not None:
            return png_answer(result.png, result.document, timings, started)
        return json_answer(result.document, timings, started)
    documents = [
        {"filename": filename, **result.document}
        for (filename, _, _), result in zip(images, results, strict=True)
    ]
    batch = {"model": model.info.name, "model_version": model.info.version, "results": documents}
    return json_answer(batch, {"read": read_ms}, started)
