"""Anomaly map -> PNG bytes, on a FIXED value scale per model so that a good part looks calm.

Never min-max per image: that would stretch the noise of a defect-free image to full red. The scale is
(0, 2 * threshold): the decision threshold sits at the middle of the colour range (jet's green-yellow),
anything at or above twice the threshold is saturated.

Encoding (server.png): gray as an 8-bit gray PNG, jet as a palette PNG (the levels plus the jet table: a
third of the bytes of RGB, decoded to the same colours), overlay as RGB.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from server.png import encode_png

HEATMAP_STYLES = ("gray", "jet", "overlay")
DEFAULT_VALUE_RANGE = (0.0, 0.2)
OVERLAY_ALPHA = 0.5


def _jet_lookup_table() -> np.ndarray:
    """(256, 3) uint8: jet (dark blue -> cyan -> yellow -> dark red) at matplotlib's breakpoints."""
    x = np.linspace(0.0, 1.0, 256)
    red = np.interp(x, [0.0, 0.35, 0.66, 0.89, 1.0], [0.0, 0.0, 1.0, 1.0, 0.5])
    green = np.interp(x, [0.0, 0.125, 0.375, 0.64, 0.91, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    blue = np.interp(x, [0.0, 0.11, 0.34, 0.65, 1.0], [0.5, 1.0, 1.0, 0.0, 0.0])
    return np.round(np.stack([red, green, blue], axis=1) * 255.0).astype(np.uint8)  # (256, 3)


JET_LUT = _jet_lookup_table()


def heatmap_value_range(threshold: float | None) -> tuple[float, float]:
    """The model's fixed colour scale: (0, 2 * threshold), or (0, 0.2) without a usable threshold."""
    if threshold is None or not np.isfinite(threshold) or threshold <= 0:
        return DEFAULT_VALUE_RANGE
    return (0.0, 2.0 * float(threshold))


def _to_levels(anomaly_map: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """(H, W) float -> (H, W) uint8 in 0..255 on the fixed scale (values outside are clipped)."""
    low, high = value_range
    gain = 255.0 / (high - low)
    scaled = anomaly_map * np.float32(gain)  # (H, W) float32, a new array: the rest works in place
    scaled += np.float32(0.5 - low * gain)  # rounds to nearest when truncated below
    np.fmax(scaled, 0.0, out=scaled)  # fmax: NaN becomes 0 (the low end), as nan_to_num(nan=low) did
    np.fmin(scaled, 255.0, out=scaled)
    return scaled.astype(np.uint8)


def _jet_image(levels: np.ndarray) -> Image.Image:
    """(H, W) uint8 levels -> RGB jet image (a palette lookup in Pillow: several times faster than numpy)."""
    image = Image.fromarray(levels)  # mode L
    image.putpalette(JET_LUT.tobytes(), rawmode="RGB")  # now mode P
    return image.convert("RGB")


def render_heatmap(
    anomaly_map: np.ndarray,
    *,
    style: str = "jet",
    value_range: tuple[float, float],
    size: tuple[int, int] | None = None,
    background: np.ndarray | None = None,
) -> bytes:
    """(H, W) float32 anomaly map -> PNG: 'gray' (8-bit gray), 'jet' (palette) or 'overlay' (RGB: jet over
    the image).

    `size` (width, height) resizes the map bilinearly first (e.g. to the original image size).
    `background` (3, H, W) uint8 is the model-size input image, needed for 'overlay' (resized to match).
    """
    if style not in HEATMAP_STYLES:
        raise ValueError(f"unknown heatmap style {style!r}: use one of {', '.join(HEATMAP_STYLES)}")
    if anomaly_map.ndim != 2:
        raise ValueError(f"expected an (H, W) anomaly map, got shape {anomaly_map.shape}")
    low, high = value_range
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    if style == "overlay":
        if background is None:
            raise ValueError("the 'overlay' heatmap style needs the input image as background")
        if background.ndim != 3 or background.shape[0] != 3 or background.dtype != np.uint8:
            raise ValueError(f"background must be (3, H, W) uint8, got {background.shape} {background.dtype}")

    anomaly_map = anomaly_map.astype(np.float32, copy=False)
    if size is not None and size != (anomaly_map.shape[1], anomaly_map.shape[0]):
        resized = Image.fromarray(anomaly_map).resize(size, Image.Resampling.BILINEAR)
        anomaly_map = np.asarray(resized)  # (size[1], size[0])
    levels = _to_levels(anomaly_map, value_range)  # (h, w) uint8

    if style == "gray":
        return encode_png(levels)
    if style == "jet":
        return encode_png(levels, palette=JET_LUT)

    assert background is not None  # checked above
    colours = _jet_image(levels)  # RGB, (w, h)
    image = Image.fromarray(np.ascontiguousarray(background.transpose(1, 2, 0)))  # (H, W, 3)
    if image.size != colours.size:
        image = image.resize(colours.size, Image.Resampling.BILINEAR)
    blended = np.asarray(Image.blend(image, colours, OVERLAY_ALPHA))  # (h, w, 3) uint8
    return encode_png(blended)
