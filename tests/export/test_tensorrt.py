"""TensorRT engine build, FP16 parity and runner: only with TensorRT 10 and a CUDA GPU (never faked)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from efficientad.model_dir import find_engine
from export.parity import onnxruntime_session
from server.tensorrt_runner import tensorrt_available

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(not tensorrt_available(), reason="needs the tensorrt package and a CUDA GPU"),
]


@pytest.fixture(scope="module")
def engine_model_dir(small_model_dir, tmp_path_factory):
    from export.tensorrt_engine import build_engine

    folder = tmp_path_factory.mktemp("trt") / "model"
    shutil.copytree(small_model_dir, folder)
    build_engine(folder, max_batch=4)
    return folder


def test_engine_is_cached_by_gpu_and_version(engine_model_dir):
    from export.tensorrt_engine import build_engine
    from server.tensorrt_runner import gpu_name, tensorrt_version

    plan = find_engine(engine_model_dir, gpu_name(), tensorrt_version(), 4)
    assert plan is not None and plan.stat().st_size > 0
    record = json.loads(plan.with_name(plan.name + ".json").read_text())
    assert record["parity"]["score_max_relative_error"] <= 0.02 and record["fp16"] is True
    assert (engine_model_dir / "engines" / "timing.cache").is_file()
    assert find_engine(engine_model_dir, gpu_name(), tensorrt_version(), 5) is None
    before = plan.stat().st_mtime_ns
    assert build_engine(engine_model_dir, max_batch=4) == plan  # reused, not rebuilt
    assert plan.stat().st_mtime_ns == before


def test_runner_matches_onnxruntime_at_every_batch_size(engine_model_dir):
    from server.tensorrt_runner import TensorRTRunner, gpu_name, tensorrt_version

    images = np.load(engine_model_dir / "parity_images.npy")[:4]
    reference_maps, reference_scores = onnxruntime_session(engine_model_dir / "model.onnx").run(
        None, {"image": images}
    )
    plan = find_engine(engine_model_dir, gpu_name(), tensorrt_version(), 4)
    with TensorRTRunner(plan) as runner:
        assert runner.max_batch == 4
        for batch in (1, 3, 4):
            maps, scores = runner.infer(images[:batch])
            assert maps.shape == (batch, 1, 256, 256) and maps.dtype == np.float32
            scale = max(float(np.abs(reference_scores).max()), 1e-6)
            assert np.abs(scores - reference_scores[:batch]).max() / scale <= 0.02
            assert np.abs(maps - reference_maps[:batch]).max() <= 0.05 * np.abs(reference_maps).max()
        with pytest.raises(ValueError, match="outside the engine's profile"):
            runner.infer(np.concatenate([images, images[:1]]))
        with pytest.raises(ValueError, match="uint8"):
            runner.infer(images.astype(np.float32))
