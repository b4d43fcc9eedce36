"""Where one request's time goes: decode + resize, inference (batch 1), heatmap PNG encode.

Each stage is timed on its own with the server's own functions (`server.imaging.decode_for_model`,
the serving backend's `infer`, `server.heatmap.render_heatmap`), for JPEG inputs of several sizes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from benchmarks.backends import BenchBackend
from benchmarks.timing import LatencySummary, WallClockTimer, measure_within

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 40_000_000  # the server's default


@dataclass(frozen=True)
class StageResult:
    input_size: str  # "1024x1024"
    stage: str  # "decode_resize", "inference_b1", "heatmap_png_model", "heatmap_png_original", "total"
    p50_ms: float
    p90_ms: float | None  # None for the "total" row (a sum of p50s has no percentiles)
    p99_ms: float | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _result(input_size: str, stage: str, summary: LatencySummary, detail: str) -> StageResult:
    return StageResult(input_size, stage, summary.p50_ms, summary.p90_ms, summary.p99_ms, detail)


def time_stages(
    jpegs: dict[int, bytes],
    backend: BenchBackend,
    *,
    height: int,
    width: int,
    threshold: float | None,
    warmup: int,
    iterations: int,
    repeats: int,
    budget_s: float = 15.0,
) -> list[StageResult]:
    """Per input side in `jpegs` ({side: JPEG bytes}): one row per stage plus the sum of the p50s."""
    from server.heatmap import heatmap_value_range, render_heatmap
    from server.imaging import decode_for_model

    value_range = heatmap_value_range(threshold)
    timer = WallClockTimer()
    results: list[StageResult] = []
    for side, data in sorted(jpegs.items()):
        input_size = f"{side}x{side}"

        def decode(data: bytes = data) -> tuple[np.ndarray, tuple[int, int]]:
            return decode_for_model(
                data, content_type="image/jpeg", height=height, width=width, max_pixels=MAX_IMAGE_PIXELS
            )

        model_input, original_size = decode()  # (3, H, W) uint8, (width, height)
        infer = backend.make_call(model_input[None])  # (1, 3, H, W)
        anomaly_map = np.asarray(infer()[0], dtype=np.float32)[0, 0]  # (H, W)
        stage_timer = backend.timer if backend.device == "cuda" else timer

        def heatmap_at_model_size(anomaly_map: np.ndarray = anomaly_map) -> bytes:
            return render_heatmap(anomaly_map, style="jet", value_range=value_range)

        def heatmap_at_original_size(
            anomaly_map: np.ndarray = anomaly_map, size: tuple[int, int] = original_size
        ) -> bytes:
            return render_heatmap(anomaly_map, style="jet", value_range=value_range, size=size)

        original = f"{original_size[0]}x{original_size[1]}"
        timings = [
            ("decode_resize", decode, timer, f"decode_for_model, {len(data)} B JPEG -> {height}x{width}"),
            ("inference_b1", infer, stage_timer, backend.label),
            ("heatmap_png_model", heatmap_at_model_size, timer, f"jet PNG {width}x{height}"),
            ("heatmap_png_original", heatmap_at_original_size, timer, f"jet PNG {original}"),
        ]
        for stage, call, stage_clock, detail in timings:
            summary, _ = measure_within(
                call,
                batch_size=1,
                timer=stage_clock,
                warmup=warmup,
                iterations=iterations,
                repeats=repeats,
                budget_s=budget_s,
            )
            results.append(_result(input_size, stage, summary, detail))
        counted = ("decode_resize", "inference_b1", "heatmap_png_model")
        total = sum(row.p50_ms for row in results if row.input_size == input_size and row.stage in counted)
        detail = "sum of p50s: decode + inference + heatmap at model size (the server's default)"
        results.append(StageResult(input_size, "total", total, None, None, detail))
    return results
