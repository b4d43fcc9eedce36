"""`write_triton_repository`: configs that Triton's own ModelConfig parses and that match the ONNX graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from efficientad.errors import UserError
from efficientad.model_dir import engine_filename, read_model_dir
from export.triton import write_triton_repository

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is needed to parse Triton's ModelConfig"
)
text_format = pytest.importorskip("google.protobuf.text_format")

ONNX_TO_TRITON = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}


def parse_config(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def graph_signature(onnx_path: Path) -> dict[str, tuple[str, list]]:
    """name -> (Triton type, full shape with the batch dim as a string) read with `onnx`, not ORT."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    signature = {}
    for value in [*graph.input, *graph.output]:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        signature[value.name] = (ONNX_TO_TRITON[tensor.elem_type], dims)
    return signature


def config_signature(config) -> dict[str, tuple[str, list]]:
    """name -> (Triton type, the shape Triton hands the model: [batch] + (reshape or dims))."""
    type_name = model_config_pb2.DataType.Name
    signature = {}
    for tensor in [*config.input, *config.output]:
        shape = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
        signature[tensor.name] = (type_name(tensor.data_type), ["batch", *shape])
    return signature


def test_repository_layout_and_configs_match_the_onnx_graph(exported_model_dir: Path, tmp_path: Path) -> None:
    out = write_triton_repository(
        exported_model_dir, tmp_path / "repo", max_batch=16, max_queue_delay_us=1500
    )
    name = exported_model_dir.name
    onnx_config = parse_config(out / name / "config.pbtxt")
    trt_config = parse_config(out / f"{name}_trt" / "config.pbtxt")

    assert (out / name / "1" / "model.onnx").read_bytes() == (exported_model_dir / "model.onnx").read_bytes()
    assert onnx_config.name == name and onnx_config.platform == "onnxruntime_onnx"
    assert trt_config.name == f"{name}_trt" and trt_config.platform == "tensorrt_plan"

    graph = graph_signature(exported_model_dir / "model.onnx")
    assert set(graph) == {"image", "anomaly_map", "score"}
    assert all(isinstance(shape[0], str) for _, shape in graph.values()), "batch dims must be dynamic"
    for config in (onnx_config, trt_config):
        assert [t.name for t in config.input] == ["image"]
        assert [t.name for t in config.output] == ["anomaly_map", "score"]
        ours = config_signature(config)
        for tensor_name, (type_name, shape) in graph.items():
            assert ours[tensor_name][0] == type_name, tensor_name
            assert ours[tensor_name][1][1:] == shape[1:], tensor_name
        score = next(t for t in config.output if t.name == "score")
        assert list(score.dims) == [1] and score.HasField("reshape") and list(score.reshape.shape) == []

        assert config.max_batch_size == 16
        assert config.dynamic_batching.max_queue_delay_microseconds == 1500
        preferred = list(config.dynamic_batching.preferred_batch_size)
        assert preferred == sorted(preferred) and preferred[-1] == 16 and all(1 <= p <= 16 for p in preferred)
        assert [group.kind for group in config.instance_group] == [
            model_config_pb2.ModelInstanceGroup.KIND_GPU
        ]
        warmup = config.model_warmup[0]
        assert warmup.batch_size == 1 and list(warmup.inputs["image"].dims) == [3, 64, 64]

    info = read_model_dir(exported_model_dir)
    readme = (out / "README.md").read_text()
    assert info.version in readme and "score > 0.1" in readme


def test_the_onnx_model_in_the_repository_runs_with_the_declared_shapes(
    exported_model_dir: Path, tmp_path: Path
) -> None:
    """What Triton will feed (N, *dims) and expect back: run the copied graph at batch 3."""
    out = write_triton_repository(exported_model_dir, tmp_path / "repo", max_batch=4)
    name = exported_model_dir.name
    config = parse_config(out / name / "config.pbtxt")
    session = onnxruntime.InferenceSession(
        str(out / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    image = config.input[0]
    images = np.random.default_rng(0).integers(0, 256, size=(3, *image.dims), dtype=np.uint8)
    results = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {image.name: images}), strict=True)
    )
    for output in config.output:
        expected = [3, *(output.reshape.shape if output.HasField("reshape") else output.dims)]
        assert list(results[output.name].shape) == expected, output.name
        assert results[output.name].dtype == np.float32


def test_trt_variant_without_an_engine_explains_how_to_build_it(
    exported_model_dir: Path, tmp_path: Path
) -> None:
    out = write_triton_repository(exported_model_dir, tmp_path / "repo", max_batch=8)
    trt_model = out / f"{exported_model_dir.name}_trt"
    assert not (trt_model / "1" / "model.plan").exists()
    note = (trt_model / "README.md").read_text()
    assert "trtexec" in note and "--maxShapes=image:8x3x64x64" in note and "efficientad engine" in note


def test_trt_variant_copies_a_cached_plan_that_covers_max_batch(
    exported_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(exported_model_dir, model_dir)
    engines = model_dir / "engines"
    engines.mkdir(exist_ok=True)
    small = engines / engine_filename("NVIDIA H100 80GB HBM3", "10.13.3", 4)
    covering = engines / engine_filename("NVIDIA H100 80GB HBM3", "10.13.3", 32)
    small.write_bytes(b"plan for batch <= 4")
    covering.write_bytes(b"plan for batch <= 32")

    out = write_triton_repository(model_dir, tmp_path / "repo", max_batch=16)
    trt_model = out / "model_trt"
    assert (trt_model / "1" / "model.plan").read_bytes() == b"plan for batch <= 32"
    assert "TensorRT 10.13.3" in (out / "README.md").read_text()
    assert parse_config(trt_model / "config.pbtxt").max_batch_size == 16


def test_existing_output_needs_force_and_force_only_replaces_a_repository(
    exported_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "repo"
    write_triton_repository(exported_model_dir, out, max_batch=8)
    with pytest.raises(UserError, match="already exists"):
        write_triton_repository(exported_model_dir, out, max_batch=4)
    assert parse_config(out / "cookie" / "config.pbtxt").max_batch_size == 8

    write_triton_repository(exported_model_dir, out, max_batch=4, force=True)
    assert parse_config(out / "cookie" / "config.pbtxt").max_batch_size == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"], "no staging folder may remain"

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a Triton model repository"):
        write_triton_repository(exported_model_dir, precious, force=True)
    assert (precious / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(("keyword", "value"), [("max_batch", 0), ("max_queue_delay_us", -1)])
def test_bad_batching_values_are_user_errors(
    exported_model_dir: Path, tmp_path: Path, keyword, value
) -> None:
    with pytest.raises(UserError, match=str(value)):
        write_triton_repository(exported_model_dir, tmp_path / "repo", **{keyword: value})
    assert not (tmp_path / "repo").exists()


def test_a_folder_that_is_not_a_model_dir_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"model\.json"):
        write_triton_repository(tmp_path, tmp_path / "repo")


def test_export_triton_command(exported_model_dir: Path, tmp_path: Path) -> None:
    from efficientad.cli import main

    out = tmp_path / "repo"
    assert main(["export-triton", str(exported_model_dir), "--out", str(out), "--max-batch", "8"]) == 0
    assert parse_config(out / "cookie" / "config.pbtxt").max_batch_size == 8
    assert main(["export-triton", str(exported_model_dir), "--out", str(out)]) == 2
