"""server/scoring.py without an app: a real serving state (ONNX Runtime on a small exported model) scores
real cookie photos; the answer document, the regions and the errors are those the routes send."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.backends import create_backend
from server.config import Settings
from server.errors import ApiError
from server.heatmap import heatmap_value_range
from server.scoring import RenderOptions, Scored, score_images
from server.state import ServedModel, ServingState
from tests.server.conftest import COOKIE_IMAGES

JPEG = "image/jpeg"


def _options(threshold: float | None, *, heatmap: bool = False) -> RenderOptions:
    return RenderOptions(
        heatmap=heatmap,
        style="jet",
        original_size=False,
        threshold=threshold,
        value_range=heatmap_value_range(threshold),
    )


def _with_state(model_dir: Path, work: Callable[[ServingState, ServedModel], Awaitable[Any]]) -> Any:
    settings = Settings(model_dirs=[model_dir], backend="onnxruntime-cpu", intra_op_threads=1)

    async def run() -> Any:
        state = ServingState(settings, create_backend)
        await state.start()
        try:
            with state.use(state.default_model) as model:
                return await work(state, model)
        finally:
            await state.stop()

    return asyncio.run(run())


def _score(
    model_dir: Path, images: list[tuple[str | None, bytes, str | None]], options: RenderOptions
) -> list[Scored]:
    async def work(state: ServingState, model: ServedModel) -> list[Scored]:
        started = time.perf_counter()
        return await score_images(state, model, images, options, started, started + 30.0)

    return _with_state(model_dir, work)  # type: ignore[no-any-return]


def test_one_photo_gives_the_answer_document(small_model_dir: Path) -> None:
    data = COOKIE_IMAGES[0].read_bytes()
    (result,) = _score(small_model_dir, [(None, data, JPEG)], _options(1e9, heatmap=True))
    document = result.document
    assert set(document) == {
        "model",
        "model_version",
        "score",
        "is_anomaly",
        "threshold",
        "heatmap_png",
        "heatmap_size",
        "image_size",
        "regions",
        "timings_ms",
    }
    assert np.isfinite(document["score"]) and document["is_anomaly"] is False
    assert document["regions"] == []  # nothing above a threshold of 1e9
    with Image.open(io.BytesIO(data)) as photo:
        assert document["image_size"] == list(photo.size)
    assert result.png is not None and base64.b64decode(document["heatmap_png"]) == result.png
    with Image.open(io.BytesIO(result.png)) as heatmap:
        assert list(heatmap.size) == document["heatmap_size"] == [64, 64]
    assert list(document["timings_ms"]) == ["decode", "queue", "inference", "encode", "total"]


def test_regions_without_a_heatmap_and_none_without_a_threshold(small_model_dir: Path) -> None:
    """Below every map value: the whole map is one region; no threshold: no regions, no verdict."""
    data = COOKIE_IMAGES[0].read_bytes()
    images = [("a.jpg", data, JPEG), ("b.jpg", data, JPEG)]
    above = _score(small_model_dir, images, _options(-1e9))
    assert [len(result.document["regions"]) for result in above] == [1, 1]
    assert all(result.document["is_anomaly"] and result.png is None for result in above)
    unset = _score(small_model_dir, images[:1], _options(None))
    assert unset[0].document["regions"] == [] and unset[0].document["is_anomaly"] is False


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        (b"", JPEG, 400, "empty_body"),
        (b"not an image at all", JPEG, 400, "undecodable_image"),
        (b"GIF89a" + bytes(64), "image/gif", 415, "unsupported_media_type"),
    ],
)
def test_bad_images_are_api_errors_naming_the_file(
    small_model_dir: Path, data: bytes, content_type: str, status: int, code: str
) -> None:
    good = COOKIE_IMAGES[0].read_bytes()
    with pytest.raises(ApiError) as raised:
        _score(small_model_dir, [("good.jpg", good, JPEG), ("bad.jpg", data, content_type)], _options(0.1))
    assert (raised.value.status, raised.value.code) == (status, code)
    assert raised.value.detail.startswith("bad.jpg: ")


def test_a_passed_deadline_is_a_504(small_model_dir: Path) -> None:
    data = COOKIE_IMAGES[0].read_bytes()

    async def work(state: ServingState, model: ServedModel) -> None:
        started = time.perf_counter()
        await score_images(state, model, [(None, data, JPEG)], _options(0.1), started, started - 1.0)

    with pytest.raises(ApiError) as raised:
        _with_state(small_model_dir, work)
    assert (raised.value.status, raised.value.code) == (504, "deadline_exceeded")
