"""Response shapes of the HTTP API and the routes' OpenAPI descriptions, for /docs and for clients to read."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from server.imaging import SUPPORTED_CONTENT_TYPES
from server.uploads import MULTIPART


class Timings(BaseModel):
    read: float = Field(description="ms receiving the request body")
    decode: float = Field(description="ms decoding and resizing the image")
    queue: float = Field(description="ms waiting for a batch")
    inference: float = Field(description="ms of the batched inference call")
    encode: float = Field(description="ms encoding the heatmap PNG")
    total: float = Field(description="ms from the request's start to this result")


class Region(BaseModel):
    x: int = Field(description="left edge in original-image pixels")
    y: int = Field(description="top edge in original-image pixels")
    width: int
    height: int
    area: int = Field(description="original-image pixels above the threshold in this region")
    max_score: float = Field(description="the anomaly map's maximum inside the region")


class Prediction(BaseModel):
    model: str
    model_version: str = Field(description="first 12 hex digits of model.onnx's sha256")
    score: float = Field(description="image anomaly score: the maximum of the anomaly map")
    is_anomaly: bool = Field(description="score > threshold (false when there is no threshold)")
    threshold: float | None
    heatmap_png: str | None = Field(description="base64 PNG of the anomaly map, null with heatmap=none")
    heatmap_size: list[int] | None = Field(description="[width, height] of the heatmap PNG")
    image_size: list[int] = Field(description="[width, height] of the uploaded image")
    regions: list[Region] = Field(
        description="connected parts of the map above the threshold in use, largest max_score first "
        "(at most max_regions); [] without a threshold"
    )
    timings_ms: Timings


class FilePrediction(Prediction):
    filename: str


class BatchPrediction(BaseModel):
    model: str
    model_version: str
    results: list[FilePrediction]


class ErrorBody(BaseModel):
    error: str = Field(description="a short machine-readable code, e.g. undecodable_image")
    detail: str = Field(description="what was wrong, for a person")


class ModelDescription(BaseModel):
    name: str
    version: str
    input_size: list[int] = Field(description="[width, height] the model runs at")
    model_size: str = Field(description="small or medium (PDN size)")
    threshold: float | None
    backend: str
    max_batch_size: int
    max_batch_delay_ms: float
    default: bool


class ModelReload(BaseModel):
    model: str
    version: str = Field(description="the version now served")
    previous_version: str
    threshold: float | None = Field(description="the threshold now in use")
    previous_threshold: float | None
    reload_s: float = Field(description="seconds to load and warm up the new backend")


class ModelList(BaseModel):
    default: str
    models: list[ModelDescription]


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    models: list[str]
    detail: str | None = None


# ------------------------------------------------------------ OpenAPI descriptions of the routes

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
