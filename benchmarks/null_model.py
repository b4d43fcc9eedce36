"""A null model: the real model-dir contract with a graph that costs next to nothing.

For measuring the server itself (HTTP, decode, batching, heatmap, JSON) without the network in the way.
Made by the bench in a temporary or cache folder, never shipped as a model: its model.json says so, and
its scores mean nothing (the red channel scaled to 0..0.1, its maximum as the score).

Its map has the structure of a real one: EfficientAD's map is computed at 1/4 of the input resolution
(the PDN's feature stride) and upsampled bilinearly, so it is smooth; this one is the red channel averaged
over 4x4 cells and upsampled the same way. The heatmap PNG and the defect regions then cost what they
cost on a real answer (a per-pixel texture would compress worse and break into more regions than any
real map does).

    image (N, 3, H, W) uint8 -> anomaly_map (N, 1, H, W) float32 = upsample(avgpool4(image[:, :1])) / 2550
                             -> score (N,) float32 = max over the map
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from efficientad.files import file_sha256
from efficientad.model_dir import (
    INPUT_NAME,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    MODEL_JSON_FILE,
    ONNX_FILE,
    OUTPUT_NAMES,
    io_description,
)

NULL_MODEL_SIZE = "null"
NULL_THRESHOLD = 0.05  # half the map's range: some images are "anomalies", so both verdicts are exercised
NULL_OPSET = 17
_MAP_SCALE = 1.0 / 2550.0


def _null_graph(height: int, width: int) -> bytes:
    """The ONNX graph as bytes: Slice the first channel, Cast to float, scale it, ReduceMax for the score."""
    import onnx
    from onnx import TensorProto, helper

    anomaly_map, score = OUTPUT_NAMES
    constants = [
        helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
        helper.make_tensor("ends", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [_MAP_SCALE]),
    ]
    constants.append(helper.make_tensor("size_factors", TensorProto.FLOAT, [4], [1.0, 1.0, 4.0, 4.0]))
    nodes = [
        helper.make_node("Slice", [INPUT_NAME, "starts", "ends", "axes"], ["red"]),  # (N, 1, H, W) uint8
        helper.make_node("Cast", ["red"], ["red_float"], to=TensorProto.FLOAT),
        helper.make_node("AveragePool", ["red_float"], ["cells"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node(  # (N, 1, H/4, W/4) -> (N, 1, H, W), bilinear as the real graph's upsampling
            "Resize",
            ["cells", "", "size_factors"],
            ["smooth"],
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
        helper.make_node("Mul", ["smooth", "scale"], [anomaly_map]),  # (N, 1, H, W) float32
        helper.make_node("ReduceMax", [anomaly_map], [score], axes=[1, 2, 3], keepdims=0),  # (N,)
    ]
    graph = helper.make_graph(
        nodes,
        "efficientad-null-model",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", 3, height, width])],
        [
            helper.make_tensor_value_info(anomaly_map, TensorProto.FLOAT, ["batch", 1, height, width]),
            helper.make_tensor_value_info(score, TensorProto.FLOAT, ["batch"]),
        ],
        initializer=constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", NULL_OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_null_model(model_dir: Path, *, height: int = 256, width: int = 256) -> Path:
    """Write model.onnx + model.json of a null model into `model_dir` (made if missing); returns it.
    `height` and `width` must be multiples of 4 (model inputs are multiples of 32)."""
    if height % 4 or width % 4:
        raise ValueError(f"the null model's input sides must be multiples of 4, got {width}x{height}")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = model_dir / ONNX_FILE
    onnx_path.write_bytes(_null_graph(height, width))
    document = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model_size": NULL_MODEL_SIZE,
        **io_description(height, width),
        "threshold": NULL_THRESHOLD,
        "onnx": {"file": ONNX_FILE, "sha256": file_sha256(onnx_path), "opset": NULL_OPSET},
        "checkpoint": {"sha256": "none", "source": None, "teacher_random": True},
        "purpose": "server-overhead benchmarks only: the real contract, a negligible graph, no detector",
        "warnings": ["a null model: its scores mean nothing"],
    }
    (model_dir / MODEL_JSON_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return model_dir
