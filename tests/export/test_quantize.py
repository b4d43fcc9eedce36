"""Optional INT8 graph: real ONNX Runtime static quantisation, kept only when measured to earn it."""

from __future__ import annotations

import numpy as np
import onnx

from export.exporter import export_model
from export.parity import onnxruntime_session
from export.quantize import build_int8_graph
from training.images import load_image_tensor

from .conftest import PARITY_IMAGES, TRAIN_IMAGES


def test_int8_graph_quantises_the_convolutions_only(tiny_run, tmp_path):
    model_dir = tmp_path / "model"
    export_model(tiny_run, model_dir, parity_images=PARITY_IMAGES[:2])
    calibration = np.stack([load_image_tensor(p, 64).numpy() for p in TRAIN_IMAGES])
    int8_path = tmp_path / "model.int8.onnx"
    build_int8_graph(model_dir / "model.onnx", int8_path, calibration)

    graph = onnx.load(str(int8_path)).graph
    producers = {output: node for node in graph.node for output in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert convs and all(producers[node.input[1]].op_type == "DequantizeLinear" for node in convs)
    head = [node for node in graph.node if node.name.startswith("/map_head/")]
    head_outputs = {name for node in head for name in node.output}
    quantized_inputs = {node.input[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    assert head and not head_outputs & quantized_inputs  # the map head computes in float end to end

    images = np.stack([load_image_tensor(p, 64).numpy() for p in PARITY_IMAGES])
    fp32_map, fp32_score = onnxruntime_session(model_dir / "model.onnx").run(None, {"image": images})
    int8_map, int8_score = onnxruntime_session(int8_path).run(None, {"image": images})
    assert int8_map.shape == fp32_map.shape and int8_map.dtype == np.float32
    assert np.abs(int8_score - fp32_score).max() <= 0.1 * np.abs(fp32_score).max()  # close, not equal
    assert not np.array_equal(int8_score, fp32_score)  # it really is another graph


def test_export_int8_records_its_verdict(tiny_run, tmp_path):
    info = export_model(
        tiny_run, tmp_path / "model", parity_images=PARITY_IMAGES, int8=True, calibration_images=TRAIN_IMAGES
    )
    verdict = info.metadata["int8"]
    assert set(verdict) >= {"kept", "decisions_identical", "latency_ms_batch1", "speedup"}
    int8_file = tmp_path / "model" / "model.int8.onnx"
    if verdict["kept"]:
        assert verdict["decisions_identical"] and verdict["speedup"] >= 1.1 and int8_file.is_file()
    else:
        assert verdict["reason"] and not int8_file.exists()
