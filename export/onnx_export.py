"""Fused module -> `model.onnx`: one graph, `image` uint8 [N,3,H,W] -> `anomaly_map` [N,1,H,W], `score` [N].

Exporter choice: torch 2.13's torch.export-based exporter (`dynamo=True`, the default since torch 2.9).
Compared with the legacy TorchScript exporter (`dynamo=False`, deprecated) on PDN-S at 256 px it gives a
graph of 87 nodes instead of 163 (no Constant nodes, no Transpose/Reshape/ConstantOfShape chain for the
padding: onnxscript's optimiser folds them), fully typed outputs (`anomaly_map` [batch,1,256,256] instead
of three anonymous dims), the same ONNX Runtime latency and the same numbers. Its cost: it emits opset
>= 18 only (converting down to 17 fails on Pad/ReduceMean), which TensorRT 10, ONNX Runtime >= 1.14 and
Triton read. The optimiser that runs inside the exporter is the only graph simplification applied: onnxsim
is not needed (no foldable constants are left) and ONNX Runtime / TensorRT fuse the rest themselves.

Node names carry the top-level module they came from (`/teacher/...`, `/student/...`, `/autoencoder/...`,
`/map_head/...`), so the TensorRT builder can keep the map head in FP32 by name.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from efficientad.model_dir import INPUT_NAME, OUTPUT_NAMES
from export.fused import FusedEfficientAD

logger = logging.getLogger(__name__)

MIN_OPSET = 18
DEFAULT_OPSET = 18
BATCH_DIM = "batch"
_NAMESPACE_KEY = "namespace"


class OnnxExportError(RuntimeError):
    """torch.onnx could not export the fused module, or the result is not a valid graph."""


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """onnxscript / onnx_ir log every optimiser pass at INFO; keep them at WARNING during our export."""
    quiet = {
        "onnxscript": logging.WARNING,
        "onnx_ir": logging.WARNING,
        "torch.onnx": logging.WARNING,
        "torch.export": logging.WARNING,
        "torch.onnx._internal.exporter._registration": logging.ERROR,  # "torchvision is not installed"
    }
    loggers = [logging.getLogger(name) for name in quiet]
    levels = [item.level for item in loggers]
    for item, level in zip(loggers, quiet.values(), strict=True):
        item.setLevel(max(item.getEffectiveLevel(), level))
    try:
        yield
    finally:
        for item, level in zip(loggers, levels, strict=True):
            item.setLevel(level)


def _scope_of(node: onnx.NodeProto) -> str | None:
    """The top-level module a node came from, read from the exporter's `namespace` metadata.

    The value looks like
    ": export.fused.FusedEfficientAD/map_head: export.fused.MapHead/sub_81: aten.sub.Tensor";
    the segment after the root names the submodule.
    """
    for prop in node.metadata_props:
        if prop.key == _NAMESPACE_KEY:
            segments = prop.value.split("/")
            if len(segments) > 2:  # root / submodule / op
                name = segments[1].split(":", 1)[0].strip()
                return name or None
    return None


def scope_node_names(model: onnx.ModelProto) -> None:
    """Prefix every node name with its top-level module: `node_sub_81` -> `/map_head/node_sub_81`."""
    for node in model.graph.node:
        scope = _scope_of(node)
        if scope and not node.name.startswith("/"):
            node.name = f"/{scope}/{node.name}"


def export_onnx(module: FusedEfficientAD, path: Path, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Write the fused module to `path` as one self-contained ONNX file with a dynamic batch axis."""
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset {opset} is not supported: the torch.export-based exporter emits opset >= {MIN_OPSET} "
            "(TensorRT 10 and ONNX Runtime >= 1.14 read it)"
        )
    module = module.eval()
    height, width = module.image_size
    example = torch.zeros(2, 3, height, width, dtype=torch.uint8)  # batch 2: never specialised to 1
    batch = torch.export.Dim(BATCH_DIM, min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter_logs():
        warnings.simplefilter("ignore", category=FutureWarning)
        try:
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={INPUT_NAME: {0: batch}},
                external_data=False,
                optimize=True,
                verbose=False,
            )
        except Exception as error:  # torch.onnx raises many types; name the stage
            raise OnnxExportError(f"torch.onnx.export failed for the fused module: {error}") from error
    model = program.model_proto
    imported = {entry.domain: entry.version for entry in model.opset_import}
    if imported.get("", 0) != opset:
        raise OnnxExportError(f"asked for opset {opset}, the exporter produced opset {imported.get('', 0)}")
    scope_node_names(model)
    model.producer_name = "efficientad"
    check_graph(model)
    path = Path(path)
    onnx.save_model(model, str(path))
    logger.info(
        "wrote %s (%d nodes, opset %d, %.1f MB)",
        path,
        len(model.graph.node),
        opset,
        path.stat().st_size / 1e6,
    )
    return model


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


def check_graph(model: onnx.ModelProto) -> None:
    """onnx.checker (full, with shape inference) plus our own contract: names, dtypes, dynamic batch."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise OnnxExportError(f"onnx.checker rejected the exported graph: {error}") from error
    inputs = {value.name: value for value in model.graph.input}
    outputs = {value.name: value for value in model.graph.output}
    if list(inputs) != [INPUT_NAME] or list(outputs) != list(OUTPUT_NAMES):
        raise OnnxExportError(
            f"graph I/O is {list(inputs)} -> {list(outputs)}, expected [image] -> {list(OUTPUT_NAMES)}"
        )
    expected = {
        INPUT_NAME: (onnx.TensorProto.UINT8, 4),
        OUTPUT_NAMES[0]: (onnx.TensorProto.FLOAT, 4),
        OUTPUT_NAMES[1]: (onnx.TensorProto.FLOAT, 1),
    }
    for name, value in {**inputs, **outputs}.items():
        dtype, rank = expected[name]
        dims = _dims(value)
        if value.type.tensor_type.elem_type != dtype or len(dims) != rank:
            raise OnnxExportError(
                f"graph tensor {name!r} has dtype {value.type.tensor_type.elem_type}, dims {dims}"
            )
        if not isinstance(dims[0], str):
            raise OnnxExportError(
                f"graph tensor {name!r} has a fixed batch dimension {dims[0]}, expected dynamic"
            )
