"""server/heatmap.py: PNG output, sizes, styles, and the fixed value scale."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.heatmap import (
    DEFAULT_VALUE_RANGE,
    HEATMAP_STYLES,
    JET_LUT,
    OVERLAY_ALPHA,
    heatmap_value_range,
    render_heatmap,
)
from server.imaging import decode_for_model

COOKIE = Path(__file__).resolve().parents[2] / "samples" / "cookie" / "test" / "anomaly" / "anomaly-10.jpg"
THRESHOLD = 0.1
VALUE_RANGE = (0.0, 2 * THRESHOLD)


def decode_png(data: bytes) -> Image.Image:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture(scope="module")
def background() -> np.ndarray:
    pixels, _ = decode_for_model(
        COOKIE.read_bytes(), content_type="image/jpeg", height=64, width=64, max_pixels=10**8
    )
    return pixels  # (3, 64, 64)


def ramp(height: int = 64, width: int = 64) -> np.ndarray:
    """A map rising left to right from 0 to 2 * threshold."""
    return np.tile(np.linspace(0.0, 2 * THRESHOLD, width, dtype=np.float32), (height, 1))  # (H, W)


def test_value_range_is_fixed_by_the_threshold() -> None:
    assert heatmap_value_range(0.1) == pytest.approx((0.0, 0.2))
    assert heatmap_value_range(0.35) == pytest.approx((0.0, 0.7))
    assert heatmap_value_range(None) == DEFAULT_VALUE_RANGE == (0.0, 0.2)
    assert heatmap_value_range(0.0) == DEFAULT_VALUE_RANGE  # a degenerate threshold gives no scale
    assert heatmap_value_range(float("nan")) == DEFAULT_VALUE_RANGE


def test_gray_levels_follow_the_fixed_scale() -> None:
    anomaly_map = np.array([[0.0, 0.05, 0.1, 0.2], [0.4, -1.0, 0.15, 0.0]], dtype=np.float32)
    anomaly_map = np.repeat(np.repeat(anomaly_map, 8, axis=0), 8, axis=1)  # (16, 32)
    image = decode_png(render_heatmap(anomaly_map, style="gray", value_range=VALUE_RANGE))
    assert image.mode == "L"
    assert image.size == (32, 16)
    levels = np.asarray(image)[::8, ::8]
    np.testing.assert_array_equal(levels, [[0, 64, 128, 255], [255, 0, 191, 0]])


def test_all_zero_map_is_the_low_colour_whatever_else_is_rendered() -> None:
    """Fixed scale: a calm map stays calm; per-image min-max would stretch its noise to full red."""
    zeros = np.zeros((32, 32), dtype=np.float32)
    hot = np.full((32, 32), 5.0, dtype=np.float32)
    render_heatmap(hot, style="jet", value_range=VALUE_RANGE)
    image = np.asarray(decode_png(render_heatmap(zeros, style="jet", value_range=VALUE_RANGE)).convert("RGB"))
    assert (image == JET_LUT[0]).all()
    np.testing.assert_array_equal(JET_LUT[0], [0, 0, 128])  # dark blue

    rng = np.random.default_rng(0)
    calm = rng.uniform(0.0, 0.01, size=(32, 32)).astype(np.float32)  # well under the threshold
    levels = np.asarray(decode_png(render_heatmap(calm, style="gray", value_range=VALUE_RANGE)))
    assert levels.max() <= 13  # 0.01 / 0.2 * 255
    hot_image = np.asarray(
        decode_png(render_heatmap(hot, style="jet", value_range=VALUE_RANGE)).convert("RGB")
    )
    assert (hot_image == JET_LUT[255]).all()


def test_jet_colours_come_from_the_lookup_table() -> None:
    image = decode_png(render_heatmap(ramp(8, 256), style="jet", value_range=VALUE_RANGE))
    assert image.mode == "P"  # the levels and the jet table: a third of the bytes of RGB
    np.testing.assert_array_equal(np.asarray(image)[3], np.arange(256))
    pixels = np.asarray(image.convert("RGB"))  # (8, 256, 3)
    np.testing.assert_array_equal(pixels[3], JET_LUT)
    assert pixels[0, 0, 2] > pixels[0, 0, 0]  # blue at the low end
    assert pixels[0, -1, 0] > pixels[0, -1, 2]  # red at the high end


def test_jet_matches_matplotlib() -> None:
    colormaps = pytest.importorskip("matplotlib").colormaps
    reference = np.round(colormaps["jet"](np.arange(256))[:, :3] * 255)
    assert np.abs(JET_LUT.astype(int) - reference).max() <= 1


@pytest.mark.parametrize("style", HEATMAP_STYLES)
def test_size_resizes_the_map(style: str, background: np.ndarray) -> None:
    data = render_heatmap(
        ramp(), style=style, value_range=VALUE_RANGE, size=(300, 200), background=background
    )
    image = decode_png(data)
    assert image.size == (300, 200)
    assert image.mode == {"gray": "L", "jet": "P", "overlay": "RGB"}[style]
    if style == "gray":
        row = np.asarray(image)[100].astype(int)
        assert row[0] < 5 and row[-1] > 250
        assert (np.diff(row) >= 0).all()  # bilinear keeps the ramp monotonic


def test_overlay_blends_jet_over_the_image(background: np.ndarray) -> None:
    anomaly_map = np.zeros((64, 64), dtype=np.float32)
    anomaly_map[:, 32:] = 1.0  # saturated right half
    image = np.asarray(
        decode_png(
            render_heatmap(anomaly_map, style="overlay", value_range=VALUE_RANGE, background=background)
        )
    ).astype(float)
    photo = background.transpose(1, 2, 0).astype(float)  # (64, 64, 3)
    expected_left = (1 - OVERLAY_ALPHA) * photo[:, :32] + OVERLAY_ALPHA * JET_LUT[0]
    expected_right = (1 - OVERLAY_ALPHA) * photo[:, 32:] + OVERLAY_ALPHA * JET_LUT[255]
    assert np.abs(image[:, :32] - expected_left).max() <= 1
    assert np.abs(image[:, 32:] - expected_right).max() <= 1
    assert image[:, :32].std() > 5  # the cookie shows through


def test_overlay_at_original_size_resizes_the_background(background: np.ndarray) -> None:
    data = render_heatmap(
        np.zeros((64, 64), np.float32),
        style="overlay",
        value_range=VALUE_RANGE,
        size=(128, 96),
        background=background,
    )
    image = np.asarray(decode_png(data)).astype(float)
    assert image.shape == (96, 128, 3)
    photo = np.asarray(
        Image.fromarray(background.transpose(1, 2, 0)).resize((128, 96), Image.Resampling.BILINEAR)
    )
    expected = (1 - OVERLAY_ALPHA) * photo + OVERLAY_ALPHA * JET_LUT[0]
    assert np.abs(image - expected).max() <= 1


def test_nan_renders_as_the_low_end() -> None:
    anomaly_map = np.full((16, 16), np.nan, dtype=np.float32)
    levels = np.asarray(decode_png(render_heatmap(anomaly_map, style="gray", value_range=VALUE_RANGE)))
    assert levels.max() == 0


def test_bad_arguments_are_refused(background: np.ndarray) -> None:
    anomaly_map = ramp()
    with pytest.raises(ValueError, match="style"):
        render_heatmap(anomaly_map, style="rainbow", value_range=VALUE_RANGE)
    with pytest.raises(ValueError, match="background"):
        render_heatmap(anomaly_map, style="overlay", value_range=VALUE_RANGE)
    with pytest.raises(ValueError, match="value_range"):
        render_heatmap(anomaly_map, style="gray", value_range=(0.2, 0.2))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        render_heatmap(anomaly_map[None], style="gray", value_range=VALUE_RANGE)
