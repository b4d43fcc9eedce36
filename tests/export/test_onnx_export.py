"""The exported graph: names, types, dynamic batch, and the same numbers as PyTorch on real images."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from efficientad.model_dir import read_model_dir
from export.fused import FusedEfficientAD
from export.parity import onnxruntime_session
from training.checkpoint import load_checkpoint
from training.images import load_image_tensor
from training.model import EfficientAD, imagenet_normalise

from .conftest import PARITY_IMAGES


def test_graph_io_opset_and_scoped_node_names(small_model_dir):
    model = onnx.load(str(small_model_dir / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert {entry.domain: entry.version for entry in model.opset_import}[""] >= 17
    (image,) = model.graph.input
    anomaly_map, score = model.graph.output
    assert (image.name, anomaly_map.name, score.name) == ("image", "anomaly_map", "score")

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert anomaly_map.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(image) == ["batch", 3, 256, 256]
    assert dims(anomaly_map) == ["batch", 1, 256, 256]
    assert dims(score) == ["batch"]
    names = [node.name for node in model.graph.node]
    assert any(name.startswith("/map_head/") for name in names)
    assert {node.op_type for node in model.graph.node if node.name.startswith("/map_head/")} >= {
        "ReduceMean", "Pad", "Resize", "ReduceMax",
    }  # fmt: skip
    assert not any(node.op_type == "Dropout" for node in model.graph.node)


@pytest.fixture(scope="module")
def cookie_batch() -> np.ndarray:
    return np.stack([load_image_tensor(p, 256).numpy() for p in PARITY_IMAGES])  # (5, 3, 256, 256) uint8


@pytest.fixture(scope="module")
def session(small_model_dir):
    return onnxruntime_session(small_model_dir / "model.onnx")


@pytest.fixture(scope="module")
def pytorch_outputs(small_run, cookie_batch):
    """Fused module and the EfficientAD module (as trained and evaluated) on the five cookie images."""
    checkpoint = load_checkpoint(small_run)
    fused = FusedEfficientAD.from_checkpoint(checkpoint)
    images = torch.from_numpy(cookie_batch)
    with torch.no_grad():
        fused_map, fused_score = fused(images)
        reference_map, _ = EfficientAD.from_checkpoint(checkpoint)(imagenet_normalise(images))
    return fused_map.numpy(), fused_score.numpy(), reference_map.numpy()


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_equals_pytorch_on_real_images(session, cookie_batch, pytorch_outputs, batch):
    fused_map, fused_score, reference_map = (array[:batch] for array in pytorch_outputs)
    onnx_map, onnx_score = session.run(None, {"image": cookie_batch[:batch]})
    assert onnx_map.shape == (batch, 1, 256, 256) and onnx_map.dtype == np.float32
    assert onnx_score.shape == (batch,) and onnx_score.dtype == np.float32
    assert np.abs(onnx_map - fused_map).max() <= 1e-4
    assert np.abs(onnx_map - reference_map).max() <= 1e-4
    assert np.abs(onnx_score - fused_score).max() <= 1e-4
    assert np.array_equal(onnx_score, onnx_map.reshape(batch, -1).max(axis=1))


def test_batch_rows_equal_single_image_runs(session, cookie_batch):
    batch_map, batch_score = session.run(None, {"image": cookie_batch})
    single_map, single_score = session.run(None, {"image": cookie_batch[4:5]})
    assert np.abs(single_map[0] - batch_map[4]).max() <= 1e-5
    assert abs(float(single_score[0]) - float(batch_score[4])) <= 1e-5
    assert len(set(np.round(batch_score, 6))) > 1  # different images give different scores


def test_model_json_reads_back(small_model_dir, small_run):
    info = read_model_dir(small_model_dir)
    checkpoint = load_checkpoint(small_run)
    assert (info.input_height, info.input_width, info.model_size) == (256, 256, "small")
    assert info.threshold == pytest.approx(0.1)
    assert info.checkpoint_sha256 == checkpoint.sha256
    assert len(info.version) == 12 and info.name == "model"
    document = info.metadata
    assert document["format"] == "efficientad-model"
    assert document["checkpoint"]["teacher_random"] is True
    assert document["checkpoint"]["metrics"] == {"image_auroc": 0.5}
    assert len(document["normalisation"]["teacher_mean"]) == 384
    assert document["normalisation"]["q_st_b"] == pytest.approx(float(checkpoint.stats.q_st_b))
    parity = document["parity"]
    assert parity["passed"] is True and parity["decisions_identical"] is not None
    assert max(parity["onnxruntime_vs_pytorch_map"].values()) <= 1e-4
    assert max(parity["onnxruntime_vs_pytorch_score"].values()) <= 1e-4
    assert {"torch", "onnx", "onnxruntime"} <= set(document["versions"])
    stored = np.load(small_model_dir / "parity_images.npy")
    assert stored.shape == (5, 3, 256, 256) and stored.dtype == np.uint8
