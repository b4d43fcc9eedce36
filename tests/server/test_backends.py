"""Backends: ONNX Runtime CPU on a real exported model, loud failures instead of silent fallbacks, `auto`."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from efficientad.model_dir import read_model_dir
from server.backends import BackendError, OnnxRuntimeBackend, create_backend, warmup_batch_sizes
from server.config import Settings
from tests.server.conftest import reference_scores


def test_warmup_batch_sizes_are_powers_of_two_plus_the_max() -> None:
    assert warmup_batch_sizes(1) == [1]
    assert warmup_batch_sizes(16) == [1, 2, 4, 8, 16]
    assert warmup_batch_sizes(12) == [1, 2, 4, 8, 12]


def test_onnxruntime_cpu_matches_the_graph_run_directly(small_model_dir: Path) -> None:
    info = read_model_dir(small_model_dir)
    backend = OnnxRuntimeBackend(info, device="cpu", intra_op_threads=1)
    assert backend.name == "onnxruntime-cpu"
    assert backend.session.get_providers() == ["CPUExecutionProvider"]
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)  # (3, 3, 64, 64)
    maps, scores = backend.infer(images)
    expected_maps, expected_scores = reference_scores(small_model_dir, list(images))
    assert maps.shape == (3, 1, 64, 64) and maps.dtype == np.float32
    assert scores.shape == (3,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps, expected_maps, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(scores, maps.reshape(3, -1).max(axis=1), rtol=1e-6)
    backend.warmup([1, 2])
    backend.close()


def test_cuda_provider_missing_fails_loudly(small_model_dir: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the missing-provider error cannot happen here")
    with pytest.raises(BackendError, match="CUDAExecutionProvider is not available"):
        OnnxRuntimeBackend(read_model_dir(small_model_dir), device="cuda")


def test_auto_picks_onnxruntime_cpu_without_a_gpu_and_says_why(
    small_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a CUDA-capable onnxruntime is installed")
    settings = Settings(model_dirs=[small_model_dir], intra_op_threads=1)
    with caplog.at_level(logging.INFO, logger="server.backends"):
        backend = create_backend("auto", read_model_dir(small_model_dir), settings)
    assert backend.name == "onnxruntime-cpu"
    message = next(
        record.getMessage() for record in caplog.records if "backend auto ->" in record.getMessage()
    )
    assert "onnxruntime-cpu" in message and "not tensorrt" in message and "not onnxruntime-cuda" in message


def test_explicit_tensorrt_without_tensorrt_is_a_clear_error(small_model_dir: Path) -> None:
    from server.backends import _tensorrt_usable

    if _tensorrt_usable()[0]:
        pytest.skip("TensorRT is usable here")
    settings = Settings(model_dirs=[small_model_dir])
    with pytest.raises(BackendError, match="tensorrt: not usable here"):
        create_backend("tensorrt", read_model_dir(small_model_dir), settings)


def test_a_graph_with_the_wrong_input_is_refused(small_model_dir: Path, tmp_path: Path) -> None:
    """A float32 input named `image` (not the fused uint8 graph) -> BackendError naming the file."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["image"], ["anomaly_map"]),
            helper.make_node("ReduceMax", ["image"], ["score"]),
        ],
        "foreign",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", 1, 4, 4]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, None),
        ],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), foreign)
    info = dataclasses.replace(read_model_dir(small_model_dir), onnx_path=foreign)
    with pytest.raises(BackendError, match=r"foreign\.onnx: expected a uint8 input 'image'"):
        OnnxRuntimeBackend(info, device="cpu")


@pytest.mark.tensorrt
def test_tensorrt_backend_matches_onnxruntime(small_model_dir: Path, tmp_path: Path) -> None:
    from server.backends import TensorRTBackend, _tensorrt_usable

    usable, why = _tensorrt_usable()
    if not usable:
        pytest.skip(why)
    import shutil

    from efficientad.cli import main

    model_dir = tmp_path / "model"
    shutil.copytree(small_model_dir, model_dir)
    info = read_model_dir(model_dir)
    with pytest.raises(BackendError, match="efficientad engine"):  # the server loads engines, never builds
        TensorRTBackend(info, max_batch_size=4)
    assert main(["engine", str(model_dir), "--max-batch", "4"]) == 0
    backend = TensorRTBackend(info, max_batch_size=4)
    try:
        assert backend.engine_path.parent == model_dir / "engines"
        images = np.random.default_rng(1).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
        maps, scores = backend.infer(images)
        _, expected = reference_scores(model_dir, list(images))
        np.testing.assert_allclose(scores, expected, rtol=0.02, atol=1e-3)
        assert maps.shape == (4, 1, 64, 64)
    finally:
        backend.close()
    again = TensorRTBackend(info, max_batch_size=2)  # the cached engine (max batch 4 >= 2) is reused
    assert again.engine_path == backend.engine_path
    again.close()
