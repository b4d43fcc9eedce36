"""Defect regions: the connected parts of an anomaly map above the threshold, as boxes in image pixels.

A line controller rejects, re-routes or marks a part by where its defects are. Each region is one
8-connected component of `map > threshold`, scaled to the original image:
`{"x", "y", "width", "height", "area", "max_score"}` with x, y the top-left corner, width/height/area in
original-image pixels, max_score the map's maximum inside the region. Largest max_score first; at most
`max_regions`; regions whose area is below `min_area` are dropped.

The components are found on cells of 4x4 map pixels (the PDN's feature stride: the map has one real value
per 4 input pixels and is upsampled in between), a cell taking part when any of its pixels is above the
threshold: 16x less work than per pixel for the same regions. Boxes follow the cells (they cover the
region, up to 3 map pixels wider); `area` counts the map pixels above the threshold exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
CELL = 4  # map pixels per cell side: the PDN's feature stride


def _pool(values: np.ndarray, combine: np.ufunc) -> np.ndarray:
    """(rows * 4, columns * 4) -> (rows, columns), combining each 4x4 block with `combine` (maximum or add)
    through strided slices: a few whole-array operations instead of a slow small-axis reduction."""
    columns = combine(combine(values[:, 0::4], values[:, 1::4]), combine(values[:, 2::4], values[:, 3::4]))
    return combine(combine(columns[0::4], columns[1::4]), combine(columns[2::4], columns[3::4]))


def _cells(anomaly_map: np.ndarray, above: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) map and its (H, W) `map > threshold` -> per 4x4 cell: (its maximum, NaN ignored; how many of
    its pixels are above the threshold, uint8)."""
    height, width = anomaly_map.shape
    if height % CELL or width % CELL:  # pad to whole cells (model maps are multiples of 32: never)
        rows, columns = -(-height // CELL) * CELL, -(-width // CELL) * CELL
        padded = np.full((rows, columns), -np.inf, dtype=np.float32)
        padded[:height, :width] = anomaly_map
        padded_above = np.zeros((rows, columns), dtype=bool)
        padded_above[:height, :width] = above
        anomaly_map, above = padded, padded_above
    return _pool(anomaly_map, np.fmax), _pool(above.view(np.uint8), np.add)  # (rows, columns) each


def _component_peaks(labels: np.ndarray, cell_max: np.ndarray, count: int) -> np.ndarray:
    """The maximum of `cell_max` over each component 1..count of `labels` -> (count,)."""
    if count == 1:
        return np.array([cell_max[labels == 1].max()], dtype=np.float64)
    flat_labels = labels.ravel()
    inside = flat_labels > 0
    order = np.argsort(flat_labels[inside], kind="stable")
    grouped = cell_max.ravel()[inside][order]
    starts = np.searchsorted(flat_labels[inside][order], np.arange(1, count + 1))
    return np.maximum.reduceat(grouped, starts).astype(np.float64)


def find_regions(
    anomaly_map: np.ndarray,
    threshold: float | None,
    *,
    image_size: tuple[int, int],
    max_regions: int = 16,
    min_area: float = 0.0,
) -> list[dict[str, Any]]:
    """(H, W) float map -> regions above `threshold` in the (width, height) `image_size`; [] without one."""
    if threshold is None or max_regions <= 0:
        return []
    if anomaly_map.ndim != 2:
        raise ValueError(f"expected an (H, W) anomaly map, got shape {anomaly_map.shape}")
    above = anomaly_map > threshold  # (H, W) bool; NaN is never above
    if not above.any():  # the common case on a line: a good part, no more work
        return []
    cell_max, cell_above = _cells(anomaly_map, above)  # (rows, columns)
    labels, count = ndimage.label(cell_above > 0, structure=_EIGHT_CONNECTED)  # components 1..count
    areas = np.bincount(labels.ravel(), weights=cell_above.ravel(), minlength=count + 1)[1:]  # (count,)
    peaks = _component_peaks(labels, cell_max, count)  # (count,)
    boxes = ndimage.find_objects(labels)  # one (row slice, column slice) of cells per component
    map_height, map_width = anomaly_map.shape
    image_width, image_height = image_size
    scale_x, scale_y = image_width / map_width, image_height / map_height
    regions = []
    for component in np.argsort(-peaks, kind="stable"):
        area = float(areas[component]) * scale_x * scale_y
        if area < min_area:
            continue
        rows, columns = boxes[component]
        x0 = math.floor(columns.start * CELL * scale_x)
        x1 = math.ceil(min(columns.stop * CELL, map_width) * scale_x)
        y0 = math.floor(rows.start * CELL * scale_y)
        y1 = math.ceil(min(rows.stop * CELL, map_height) * scale_y)
        x1, y1 = min(x1, image_width), min(y1, image_height)
        regions.append(
            {
                "x": x0,
                "y": y0,
                "width": x1 - x0,
                "height": y1 - y0,
                "area": round(area),
                "max_score": float(peaks[component]),
            }
        )
        if len(regions) == max_regions:
            break
    return regions
