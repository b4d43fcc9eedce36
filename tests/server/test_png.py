"""server/png.py: what it writes, Pillow (an independent decoder) reads back exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from server.heatmap import JET_LUT
from server.png import encode_png


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data), formats=["PNG"])
    image.load()
    return image


@pytest.fixture(scope="module")
def smooth_levels() -> np.ndarray:
    """A heatmap-like (200, 300) uint8 field: smooth, with noise, every value 0..255 somewhere."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.uniform(0, 255, (10, 15)).astype(np.float32))
    field = np.asarray(coarse.resize((300, 200), Image.Resampling.BILINEAR))
    noisy = field + rng.normal(0, 4, field.shape)
    levels = np.clip(noisy, 0, 255).astype(np.uint8)
    levels[0, :256] = np.arange(256, dtype=np.uint8)
    return levels


def test_gray(smooth_levels: np.ndarray) -> None:
    image = decode(encode_png(smooth_levels))
    assert image.mode == "L" and image.size == (300, 200)
    np.testing.assert_array_equal(np.asarray(image), smooth_levels)


def test_palette_decodes_to_the_table_colours(smooth_levels: np.ndarray) -> None:
    image = decode(encode_png(smooth_levels, palette=JET_LUT))
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), smooth_levels)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), JET_LUT[smooth_levels])


def test_rgb(smooth_levels: np.ndarray) -> None:
    rgb = np.stack([smooth_levels, 255 - smooth_levels, smooth_levels[::-1]], axis=2)  # (200, 300, 3)
    image = decode(encode_png(rgb))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), rgb)


def test_one_pixel_and_wraparound_differences() -> None:
    np.testing.assert_array_equal(np.asarray(decode(encode_png(np.array([[7]], np.uint8)))), [[7]])
    stripes = np.tile(np.array([[0], [255], [1], [254]], np.uint8), (4, 9))  # rows differ by up to 255
    np.testing.assert_array_equal(np.asarray(decode(encode_png(stripes))), stripes)


def test_smaller_than_raw(smooth_levels: np.ndarray) -> None:
    assert len(encode_png(smooth_levels, palette=JET_LUT)) < smooth_levels.size


@pytest.mark.parametrize(
    ("pixels", "palette"),
    [
        (np.zeros((4, 4), np.float32), None),
        (np.zeros((4, 4, 4), np.uint8), None),
        (np.zeros((0, 4), np.uint8), None),
        (np.zeros((4, 4), np.uint8), np.zeros((16, 3), np.uint8)),
        (np.zeros((4, 4, 3), np.uint8), JET_LUT),
    ],
)
def test_bad_arguments(pixels: np.ndarray, palette: np.ndarray | None) -> None:
    with pytest.raises(ValueError):
        encode_png(pixels, palette=palette)
