"""A Triton Inference Server model repository from one model dir (torch-free).

    OUT/
      README.md                   what is here, the threshold, how to start Triton
      <name>/config.pbtxt         platform onnxruntime_onnx, dynamic batching, KIND_GPU
      <name>/1/model.onnx         the fused graph, copied from the model dir
      <name>_trt/config.pbtxt     platform tensorrt_plan, same inputs/outputs and batching
      <name>_trt/1/model.plan     a cached engine from MODEL_DIR/engines/ if there is one,
      <name>_trt/README.md        ...otherwise how to build it inside the Triton container

The inputs and outputs are read from the ONNX graph itself (not assumed), under Triton's batching
convention: with max_batch_size > 0 the batch dimension is left out of `dims`, and a per-image scalar
such as `score` ([N] in the graph) is declared as dims [1] with `reshape: { shape: [ ] }`.

The repository is written in a temporary folder beside OUT and renamed into place, so a failure leaves
nothing half-written.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from efficientad.errors import UserError
from efficientad.model_dir import ModelInfo, parse_engine_filename, read_model_dir

logger = logging.getLogger(__name__)

ONNX_TYPE_TO_TRITON = {
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(float16)": "TYPE_FP16",
    "tensor(bfloat16)": "TYPE_BF16",
    "tensor(float)": "TYPE_FP32",
    "tensor(double)": "TYPE_FP64",
    "tensor(bool)": "TYPE_BOOL",
}
VERSION = "1"  # Triton's numbered version folder
TRT_SUFFIX = "_trt"
PLAN_FILE = "model.plan"
ONNX_FILE = "model.onnx"
README_FILE = "README.md"
CONFIG_FILE = "config.pbtxt"


class TritonExportError(UserError):
    """The model or the output folder does not allow a Triton repository to be written."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output in Triton's terms: dims exclude the batch dimension."""

    name: str
    data_type: str  # e.g. "TYPE_UINT8"
    dims: tuple[int, ...]  # without the batch dimension; () for a per-image scalar

    def to_pbtxt(self) -> str:
        lines = ["  {", f'    name: "{self.name}"', f"    data_type: {self.data_type}"]
        if self.dims:
            lines.append(f"    dims: [ {', '.join(str(d) for d in self.dims)} ]")
        else:  # [N] in the graph: Triton wants at least one dim, so declare [1] and reshape it away
            lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
        lines.append("  }")
        return "\n".join(lines)


def triton_model_name(name: str) -> str:
    """A folder name Triton accepts as a model name (letters, digits, '_', '-', '.')."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")
    if not slug:
        raise TritonExportError(f"cannot make a Triton model name from {name!r}")
    return slug


def _graph_tensors(onnx_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs, each with a dynamic batch dimension first (else TritonExportError)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
        raise TritonExportError(f"cannot read the ONNX graph {onnx_path}: {error}") from None

    def spec(node: object) -> TensorSpec:
        name, type_name, shape = node.name, node.type, list(node.shape)  # type: ignore[attr-defined]
        if type_name not in ONNX_TYPE_TO_TRITON:
            raise TritonExportError(f"{onnx_path}: tensor {name!r} has type {type_name}, unknown to Triton")
        if not shape or isinstance(shape[0], int):
            raise TritonExportError(
                f"{onnx_path}: tensor {name!r} has shape {shape}; its first dimension must be a dynamic "
                "batch (re-export with `efficientad export`)"
            )
        dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape[1:])
        return TensorSpec(name=name, data_type=ONNX_TYPE_TO_TRITON[type_name], dims=dims)

    return [spec(node) for node in session.get_inputs()], [spec(node) for node in session.get_outputs()]


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two from 4 up to max_batch, and max_batch itself: the sizes the scheduler waits for."""
    sizes = [size for size in (4, 8, 16, 32, 64, 128, 256) if size < max_batch]
    return [*sizes[-3:], max_batch]


def model_config_pbtxt(
    name: str,
    *,
    platform: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch: int,
    max_queue_delay_us: int,
) -> str:
    """Triton's ModelConfig in protobuf text format."""
    preferred = ", ".join(str(size) for size in preferred_batch_sizes(max_batch))
    input_block = ",\n".join(tensor.to_pbtxt() for tensor in inputs)
    output_block = ",\n".join(tensor.to_pbtxt() for tensor in outputs)
    warmup_inputs = "\n".join(
        f'    inputs {{ key: "{tensor.name}" value: {{ data_type: {tensor.data_type} '
        f"dims: [ {', '.join(str(max(d, 1)) for d in tensor.dims)} ] zero_data: true }} }}"
        for tensor in inputs
    )
    return f"""# Written by `efficientad export-triton`; mirrors the server's batching settings.
name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch}
version_policy: {{ latest: {{ num_versions: 1 }} }}
input [
{input_block}
]
output [
{output_block}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
instance_group [
  {{
    count: 1
    kind: KIND_GPU
  }}
]
model_warmup [
  {{
    name: "zeros_batch_1"
    batch_size: 1
{warmup_inputs}
  }}
]
"""


def _cached_plan(info: ModelInfo, max_batch: int) -> tuple[Path, str, str] | None:
    """The newest plan in the model's engines/ whose max batch covers `max_batch`: (path, gpu, TensorRT)."""
    if not info.engines_dir.is_dir():
        return None
    plans = []
    for plan in info.engines_dir.glob("*.plan"):
        parsed = parse_engine_filename(plan.name)
        if parsed is not None and parsed[2] >= max_batch and plan.is_file():
            plans.append((plan.stat().st_mtime, plan, parsed[0], parsed[1]))
    if not plans:
        return None
    _, plan, gpu, trt = max(plans)
    return plan, gpu, trt


def _trtexec_readme(name: str, info: ModelInfo, max_batch: int) -> str:
    shape = f"3x{info.input_height}x{info.input_width}"
    shapes = " ".join(
        f"--{kind}Shapes=image:{batch}x{shape}" for kind, batch in (("min", 1), ("opt", max_batch))
    )
    shapes += f" --maxShapes=image:{max_batch}x{shape}"
    return f"""# {name}: TensorRT plan not included

`{VERSION}/{PLAN_FILE}` must be built on the GPU model that serves it, with the same TensorRT version as the
Triton container (a plan is tied to both). Until it is in place, start Triton with
`--model-control-mode=explicit --load-model={name.removesuffix(TRT_SUFFIX)}` so this model is not loaded.

Either build it with this project inside a container with the Triton image's TensorRT version:

    efficientad engine MODEL_DIR --max-batch {max_batch}
    cp MODEL_DIR/engines/<gpu>__trt<version>__b{max_batch}.plan {name}/{VERSION}/{PLAN_FILE}

or with trtexec inside the Triton container itself (FP16, the map head kept in FP32 as our builder does):

    trtexec --onnx=/models/{name.removesuffix(TRT_SUFFIX)}/{VERSION}/{ONNX_FILE} \\
        --saveEngine=/models/{name}/{VERSION}/{PLAN_FILE} \\
        {shapes} \\
        --fp16 --precisionConstraints=obey \\
        --layerPrecisions='/map_head/*:fp32' --layerOutputTypes='/map_head/*:fp32'
"""


def _repository_readme(
    name: str, info: ModelInfo, max_batch: int, max_queue_delay_us: int, plan_note: str
) -> str:
    threshold = "none recorded" if info.threshold is None else f"{info.threshold:.6g}"
    return f"""# Triton model repository for `{info.name}`

Written by `efficientad export-triton` from `{info.path}` (model version {info.version},
input {info.input_width}x{info.input_height}).

| model | platform | file |
| --- | --- | --- |
| `{name}` | onnxruntime_onnx | `{name}/{VERSION}/{ONNX_FILE}` |
| `{name}{TRT_SUFFIX}` | tensorrt_plan | {plan_note} |

Input `image`: uint8 RGB, (N, 3, {info.input_height}, {info.input_width}); outputs `anomaly_map` float32
(N, 1, {info.input_height}, {info.input_width}) and `score` float32 (N). Triton returns the raw score:
an image is anomalous when `score > {threshold}` (the model's threshold).

Batching: max_batch_size {max_batch}, max_queue_delay_microseconds {max_queue_delay_us}.

    docker run --gpus=1 --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD:/models \\
        nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models
"""


def _is_our_repository(path: Path) -> bool:
    """True for a folder holding only a README and model folders with a config.pbtxt (safe to replace)."""
    if not path.is_dir():
        return False
    for entry in path.iterdir():
        if entry.name == README_FILE and entry.is_file():
            continue
        if not (entry.is_dir() and (entry / CONFIG_FILE).is_file()):
            return False
    return True


def _check_out(out: Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    if not force:
        raise TritonExportError(f"{out} already exists; pass --force to replace it")
    if not _is_our_repository(out):
        raise TritonExportError(
            f"{out} exists and is not a Triton model repository written by this command; not replacing it"
        )


def write_triton_repository(
    model_dir: Path, out: Path, *, max_batch: int = 32, max_queue_delay_us: int = 2000, force: bool = False
) -> Path:
    """Write a Triton model repository for `model_dir` to `out` (ONNX Runtime model + TensorRT variant)."""
    if max_batch < 1:
        raise TritonExportError(f"max batch must be >= 1, got {max_batch}")
    if max_queue_delay_us < 0:
        raise TritonExportError(f"max queue delay must be >= 0 microseconds, got {max_queue_delay_us}")
    info = read_model_dir(Path(model_dir))
    out = Path(out)
    _check_out(out, force)
    inputs, outputs = _graph_tensors(info.onnx_path)
    name = triton_model_name(info.name)
    trt_name = name + TRT_SUFFIX

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        onnx_model = staging / name
        (onnx_model / VERSION).mkdir(parents=True)
        shutil.copyfile(info.onnx_path, onnx_model / VERSION / ONNX_FILE)
        config = {"inputs": inputs, "outputs": outputs, "max_batch": max_batch}
        config["max_queue_delay_us"] = max_queue_delay_us
        (onnx_model / CONFIG_FILE).write_text(model_config_pbtxt(name, platform="onnxruntime_onnx", **config))

        trt_model = staging / trt_name
        (trt_model / VERSION).mkdir(parents=True)
        (trt_model / CONFIG_FILE).write_text(model_config_pbtxt(trt_name, platform="tensorrt_plan", **config))
        cached = _cached_plan(info, max_batch)
        if cached is None:
            (trt_model / README_FILE).write_text(_trtexec_readme(trt_name, info, max_batch))
            plan_note = f"not included: see `{trt_name}/{README_FILE}`"
            logger.info("no cached TensorRT plan with max batch >= %d in %s", max_batch, info.engines_dir)
        else:
            plan, gpu, trt = cached
            shutil.copyfile(plan, trt_model / VERSION / PLAN_FILE)
            plan_note = (
                f"`{trt_name}/{VERSION}/{PLAN_FILE}`, built for {gpu}, TensorRT {trt} (Triton's must match)"
            )
            logger.info("copied %s (for %s, TensorRT %s)", plan, gpu, trt)

        readme = _repository_readme(name, info, max_batch, max_queue_delay_us, plan_note)
        (staging / README_FILE).write_text(readme)
        os.chmod(staging, 0o755)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote Triton model repository %s (models %s, %s)", out, name, trt_name)
    return out
