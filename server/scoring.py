"""Scoring a request's images: decode -> batcher -> regions and heatmap -> the answer document.

No HTTP framework here: the routes read the images and choose the answer's form; this module does the
work in between, and says what went wrong as an ApiError (status, code, message naming the file).
Small work (a 256x256 JPEG, a 256x256 heatmap) runs on the event loop while it is the only image in
flight; everything else, and all of it under load, on the decode threads.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from server.batcher import BatcherClosed, DeadlineExceeded, InferenceFailed, QueueFull
from server.config import Settings
from server.errors import ApiError
from server.heatmap import render_heatmap
from server.imaging import (
    ImageError,
    ImageTooLarge,
    ImageTooSmall,
    UnsupportedImageType,
    decode_for_model,
)
from server.regions import find_regions
from server.state import ServedModel, ServingState
from server.uploads import Upload

T = TypeVar("T")
# Work done on the event loop when the server is otherwise idle (see _off_loop_when_busy): a 256x256
# JPEG (~25 KB) decodes in ~0.5 ms here; a 576x768 camera photo (~450 KB, ~12 ms) always goes to a thread.
INLINE_DECODE_MAX_BYTES = 128 * 1024
INLINE_HEATMAP_MAX_PIXELS = 256 * 256


@dataclass(frozen=True)
class RenderOptions:
    """What an answer carries beside the score: the heatmap (style, size) and the threshold in use."""

    heatmap: bool
    style: str
    original_size: bool
    threshold: float | None
    value_range: tuple[float, float]


@dataclass
class Scored:
    """One image's answer document (as in the JSON answer) and its heatmap PNG (None without one)."""

    document: dict[str, Any]
    png: bytes | None


async def score_images(
    state: ServingState,
    model: ServedModel,
    images: list[Upload],
    options: RenderOptions,
    started: float,
    deadline: float,
) -> list[Scored]:
    """Score every image concurrently (so they share batches); the first failure fails the request."""
    if len(images) == 1:
        filename, data, content_type = images[0]
        return [await score_image(state, model, data, content_type, options, started, deadline, filename)]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(
                    score_image(state, model, data, content_type, options, started, deadline, filename)
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
async def score_image(
    state: ServingState,
    model: ServedModel,
    data: bytes,
    content_type: str | None,
    options: RenderOptions,
    started: float,
    deadline: float,
    label: str | None,
) -> Scored:
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
        raise image_error(error, prefix) from None
    decode_ms = (time.perf_counter() - decode_started) * 1000

    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        raise ApiError(504, "deadline_exceeded", f"{prefix}the request deadline passed while decoding")
    try:
        result = await model.batcher.submit(pixels, timeout_s=remaining)
    except QueueFull as error:
        raise ApiError(503, "queue_full", f"{error}; retry later", retry_after(settings)) from None
    except BatcherClosed as error:
        raise ApiError(503, "not_ready", str(error), retry_after(settings)) from None
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
    # the score is the map's maximum: nothing above the threshold, no region to look for
    any_region = options.threshold is not None and result.score > options.threshold
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
            any_region,
        )
    elif any_region:
        png, regions = (
            None,
            await _off_loop_when_busy(state, True, _regions, anomaly_map, options, settings, original_size),
        )
    else:
        png, regions = None, []
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
    return Scored(document, png)


def _regions(
    anomaly_map: np.ndarray, options: RenderOptions, settings: Settings, original_size: tuple[int, int]
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
    options: RenderOptions,
    settings: Settings,
    heatmap_size: tuple[int, int],
    original_size: tuple[int, int],
    pixels: np.ndarray,
    any_region: bool,
) -> tuple[bytes, list[dict[str, Any]]]:
    """On a decode thread: the heatmap PNG and the regions, one hop off the event loop for both."""
    png = render_heatmap(
        anomaly_map,
        style=options.style,
        value_range=options.value_range,
        size=heatmap_size,
        background=pixels if options.style == "overlay" else None,
    )
    return png, _regions(anomaly_map, options, settings, original_size) if any_region else []


def add_read_time(document: dict[str, Any], read_ms: float) -> None:
    """The request body's read time first in the answer's timings (the other stages follow in order)."""
    document["timings_ms"] = {"read": round(read_ms, 3), **document["timings_ms"]}


def stages(timings_ms: dict[str, float]) -> dict[str, float]:
    """An answer's timings in pipeline order, named as in Server-Timing (encode is the heatmap)."""
    return {
        "read": timings_ms["read"],
        "decode": timings_ms["decode"],
        "queue": timings_ms["queue"],
        "inference": timings_ms["inference"],
        "heatmap": timings_ms["encode"],
    }


def retry_after(settings: Settings) -> dict[str, str]:
    """The Retry-After header that goes with a 503."""
    return {"Retry-After": str(settings.retry_after_s)}


def image_error(error: ImageError, prefix: str) -> ApiError:
    """The answer to an image that cannot be used: 415 type, 413 too large, 400 otherwise."""
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
