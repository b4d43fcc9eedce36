"""Optional CPU INT8 graph: ONNX Runtime static quantisation of the convolutions, kept only if it earns it.

`model.int8.onnx` is written only when, measured on this machine, it
1. gives the same decisions at the threshold as the FP32 graph on the parity images (the test images), and
2. is faster than the FP32 graph at batch 1 under ONNX Runtime (CPU), by at least `MIN_SPEEDUP`.
Otherwise the export goes on without it and model.json records why. Only Conv nodes are quantised (QDQ,
per-channel int8 weights, uint8 activations calibrated with MinMax on good images); the `/map_head/`
tail (distances, quantile normalisation, resize, max) computes in FP32, on features that come out of the
last convolutions at uint8 resolution. Keeping those conv outputs in float
(`OpTypesToExcludeOutputQuantization`) halved the score error (PDN-S, 256 px: max 0.0025 instead of
0.0048 on scores around 0.1), but without a QuantizeLinear after them ONNX Runtime cannot fuse those
convolutions into QLinearConv; its speed was not measured, so it is not used.

Measured on a 16-core x86 host (ONNX Runtime 1.30, PDN-S at 256 px with random weights and statistics
fitted on cookie images, 10 cookie test images): decisions identical, max score difference 0.0045,
batch-1 latency 69 -> 46 ms (16 threads) and 330 -> 144 ms (2 threads), batch 8 526 -> 349 ms.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from efficientad.model_dir import INPUT_NAME

logger = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
MIN_SPEEDUP = 1.1
TIMED_RUNS = 10


class _ImageReader:
    """ONNX Runtime calibration data reader: one uint8 image per step."""

    def __init__(self, images: np.ndarray):
        self._batches = iter([{INPUT_NAME: image[None]} for image in images])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # not needed for MinMax; part of the reader protocol
        return None


def _median_latency_ms(sessions: dict[str, Any], image: np.ndarray) -> dict[str, float]:
    """Median batch-1 latency of each session, runs interleaved so that machine load hits both alike."""
    for session in sessions.values():
        session.run(None, {INPUT_NAME: image})  # warm-up
    timings: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(TIMED_RUNS):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, {INPUT_NAME: image})
            timings[name].append(time.perf_counter() - started)
    return {name: 1000 * float(np.median(values)) for name, values in timings.items()}


def build_int8_graph(onnx_path: Path, out_path: Path, calibration_images: np.ndarray) -> None:
    """Static INT8 (QDQ) quantisation of every Conv outside `/map_head/`, calibrated on good images."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(onnx_path))
    head = [node.name for node in model.graph.node if node.name.startswith("/map_head/")]
    quantize_static(
        str(onnx_path),
        str(out_path),
        _ImageReader(calibration_images),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=head,
        calibrate_method=CalibrationMethod.MinMax,
    )


def quantize_int8(
    onnx_path: Path,
    out_path: Path,
    *,
    calibration_images: np.ndarray,
    test_images: np.ndarray,
    threshold: float | None,
) -> dict[str, Any]:
    """Try an INT8 graph; write `out_path` only if it keeps decisions and is faster; return the figures."""
    from export.parity import onnxruntime_session

    if threshold is None:
        return {"kept": False, "reason": "no threshold: decisions cannot be compared"}
    with tempfile.TemporaryDirectory(dir=Path(out_path).parent) as scratch:
        candidate = Path(scratch) / INT8_FILE
        build_int8_graph(onnx_path, candidate, calibration_images)
        fp32, int8 = onnxruntime_session(onnx_path), onnxruntime_session(candidate)
        fp32_scores = fp32.run(None, {INPUT_NAME: test_images})[1]
        int8_scores = int8.run(None, {INPUT_NAME: test_images})[1]
        latency = _median_latency_ms({"fp32": fp32, "int8": int8}, test_images[:1])
        same = bool(np.all((fp32_scores >= threshold) == (int8_scores >= threshold)))
        speedup = latency["fp32"] / latency["int8"]
        report = {
            "decisions_identical": same,
            "score_max_abs_difference": float(np.max(np.abs(fp32_scores - int8_scores))),
            "latency_ms_batch1": latency,
            "speedup": speedup,
            "images": len(test_images),
            "calibration_images": len(calibration_images),
        }
        if not same:
            report.update(kept=False, reason="decisions at the threshold differ from the FP32 graph")
        elif speedup < MIN_SPEEDUP:
            report.update(kept=False, reason=f"not faster enough ({speedup:.2f}x < {MIN_SPEEDUP}x)")
        else:
            candidate.replace(out_path)
            report.update(kept=True, file=Path(out_path).name)
    logger.info("INT8 graph: %s", report)
    return report
