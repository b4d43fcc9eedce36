"""TensorRT 10: build an FP16 engine from `model.onnx` and check it against ONNX Runtime.

Torch-free (numpy, tensorrt, onnxruntime). Nothing here imports tensorrt or cuda-python at import time.
Running an engine is `server.tensorrt_runner` (the server never imports the exporter); the build's parity
check runs the new engine through it. Import the runner's names from there, not from here.

    EngineBuilder   model.onnx -> serialised plan (explicit batch, profile 1..max_batch on `image`, FP16,
                    the `/map_head/` layers kept in FP32, timing cache on disk)
    build_engine    builder + FP16 parity check against ONNX Runtime; saves the plan only if it passes

Every TensorRT and CUDA call's result is checked; errors name the call and the tensor.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from efficientad.errors import UserError
from efficientad.files import file_sha256
from efficientad.model_dir import INPUT_NAME, OUTPUT_NAMES, engine_filename, read_model_dir
from server.tensorrt_runner import (  # running an engine, for the build's parity check
    TensorRTError,
    TensorRTRunner,
    TensorRTUnavailable,
    gpu_name,
    import_tensorrt,
    make_logger,
    tensorrt_available,
    tensorrt_version,
)

__all__ = [
    "FP32_LAYER_SCOPES",
    "MAP_RELATIVE_TOLERANCE",
    "PARITY_IMAGES_FILE",
    "SCORE_RELATIVE_TOLERANCE",
    "TIMING_CACHE_FILE",
    "WEAKLY_TYPED_TENSORRT_MAJOR",
    "EngineBuilder",
    "EngineParityError",
    "build_engine",
    "check_engine_parity",
    "load_parity_images",
]

logger = logging.getLogger(__name__)

WEAKLY_TYPED_TENSORRT_MAJOR = 10  # FP16 flag + per-layer precision exist up to 10.x (removed in 11)
TIMING_CACHE_FILE = "timing.cache"
PARITY_IMAGES_FILE = "parity_images.npy"  # written by the exporter: (N, 3, H, W) uint8 real images
FP32_LAYER_SCOPES = ("/map_head/",)  # distances, quantile normalisation, pad, resize, reduce-max
SCORE_RELATIVE_TOLERANCE = 0.02  # |score_trt - score_ort| <= 2% of max(|score_ort|, threshold)
MAP_RELATIVE_TOLERANCE = 0.05  # max |map diff| <= 5% of the map's largest magnitude


class EngineParityError(UserError):
    """The FP16 engine's scores or decisions differ from ONNX Runtime's: the engine is not saved."""


# ------------------------------------------------------------------------------------------------ build


def _parser_errors(parser: Any) -> str:
    """Every ONNX parser error in full: description, code, node index/name/operator, parser source line."""
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        parts = [f"[{index}] {error.desc()}", f"code={error.code()}", f"node={error.node()}"]
        for label, method in (("node_name", "node_name"), ("operator", "node_operator")):
            if hasattr(error, method):
                parts.append(f"{label}={getattr(error, method)()}")
        parts.append(f"at {error.file()}:{error.line()} ({error.func()})")
        lines.append(" ".join(parts))
    return "\n".join(lines)


class EngineBuilder:
    """Build a serialised TensorRT plan from the fused ONNX graph."""

    def __init__(
        self,
        onnx_path: Path,
        *,
        max_batch: int = 32,
        fp16: bool = True,
        workspace_gb: float = 4.0,
        timing_cache: Path | None = None,
        fp32_layer_scopes: tuple[str, ...] = FP32_LAYER_SCOPES,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.onnx_path = Path(onnx_path)
        self.max_batch = int(max_batch)
        self.fp16 = fp16
        self.workspace_bytes = int(workspace_gb * (1 << 30))
        self.timing_cache = None if timing_cache is None else Path(timing_cache)
        self.fp32_layer_scopes = fp32_layer_scopes
        self.trt = import_tensorrt()
        major = int(str(self.trt.__version__).split(".")[0])
        if fp16 and major > WEAKLY_TYPED_TENSORRT_MAJOR:
            raise TensorRTUnavailable(
                f"TensorRT {self.trt.__version__} has no FP16 builder flag (11.x builds strongly typed "
                "networks only): for an FP16 engine install TensorRT 10 (pip install 'tensorrt>=10,<11'), "
                "or build FP32 with --no-fp16"
            )
        self.trt_logger = make_logger(self.trt)

    def _parse(self, builder: Any) -> tuple[Any, Any]:
        trt = self.trt
        network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch
        if network is None:
            raise TensorRTError("builder.create_network returned None")
        parser = trt.OnnxParser(network, self.trt_logger)
        if not parser.parse_from_file(str(self.onnx_path)):
            raise TensorRTError(
                f"TensorRT's ONNX parser rejected {self.onnx_path}:\n{_parser_errors(parser)}"
            )
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        outputs = [network.get_output(i).name for i in range(network.num_outputs)]
        if [t.name for t in inputs] != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
            raise TensorRTError(
                f"graph I/O is {[t.name for t in inputs]} -> {outputs}, expected image -> {OUTPUT_NAMES}"
            )
        return network, parser  # the parser must outlive the network's use (it owns the weights)

    def _keep_scopes_in_fp32(self, network: Any) -> int:
        """Pin the map head's floating-point layers to FP32 (honoured with OBEY_PRECISION_CONSTRAINTS)."""
        trt = self.trt
        pinned = 0
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if not any(scope in layer.name for scope in self.fp32_layer_scopes):
                continue
            float_outputs = [
                j for j in range(layer.num_outputs) if layer.get_output(j).dtype in (trt.float32, trt.float16)
            ]
            if not float_outputs or layer.type in (trt.LayerType.SHAPE, trt.LayerType.CONSTANT):
                continue
            layer.precision = trt.float32
            for j in float_outputs:
                layer.set_output_type(j, trt.float32)
            pinned += 1
        return pinned

    def build(self) -> bytes:
        """The serialised engine; raises TensorRTError with the parser's or builder's message on failure."""
        trt = self.trt
        builder = trt.Builder(self.trt_logger)
        network, _parser = self._parse(builder)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if self.fp16:
            if not getattr(builder, "platform_has_fast_fp16", True):
                logger.warning("this GPU has no fast FP16; building anyway")
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            pinned = self._keep_scopes_in_fp32(network)
            logger.info("FP16 engine; %d map-head layers pinned to FP32", pinned)
            if pinned == 0:
                raise TensorRTError(
                    f"no layer matched the FP32 scopes {self.fp32_layer_scopes}: is this our graph?"
                )

        image = network.get_input(0)
        _, channels, height, width = tuple(image.shape)
        profile = builder.create_optimization_profile()
        optimum = max(1, self.max_batch // 2)
        profile.set_shape(
            INPUT_NAME, (1, channels, height, width), (optimum, channels, height, width),
            (self.max_batch, channels, height, width),
        )  # fmt: skip
        if config.add_optimization_profile(profile) < 0:
            raise TensorRTError(f"optimisation profile for tensor {INPUT_NAME!r} was rejected")

        cache_bytes = (
            self.timing_cache.read_bytes() if self.timing_cache and self.timing_cache.is_file() else b""
        )
        cache = config.create_timing_cache(cache_bytes)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            logger.warning(
                "timing cache %s does not fit this TensorRT/GPU; starting a new one", self.timing_cache
            )
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=True)

        started = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise TensorRTError(
                f"TensorRT could not build an engine from {self.onnx_path}: {self.trt_logger.recent_errors()}"
            )
        logger.info(
            "built engine in %.1f s (max batch %d, fp16 %s)",
            time.perf_counter() - started,
            self.max_batch,
            self.fp16,
        )
        if self.timing_cache is not None:
            _atomic_write_bytes(self.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
        return bytes(memoryview(serialized))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


# ------------------------------------------------------------------------------------------ build + check


def load_parity_images(model_dir: Path) -> np.ndarray:
    """The real images the exporter stored beside the graph: (N, 3, H, W) uint8."""
    path = Path(model_dir) / PARITY_IMAGES_FILE
    if not path.is_file():
        raise UserError(
            f"{path} is missing: re-export the model (the engine's FP16 check needs its real images)"
        )
    images = np.load(path, allow_pickle=False)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"{path} holds {images.dtype} {images.shape}, expected uint8 (N, 3, H, W)")
    return images


def check_engine_parity(
    runner: TensorRTRunner, onnx_path: Path, images: np.ndarray, threshold: float | None
) -> dict[str, Any]:
    """Engine vs ONNX Runtime (CPU, FP32) on the same images: score error, map error, decisions."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference_maps, reference_scores = session.run(None, {INPUT_NAME: images})
    maps_list, scores_list = [], []
    for start in range(0, len(images), runner.max_batch):
        batch_maps, batch_scores = runner.infer(images[start : start + runner.max_batch])
        maps_list.append(batch_maps)
        scores_list.append(batch_scores)
    maps, scores = np.concatenate(maps_list), np.concatenate(scores_list)
    _, single_score = runner.infer(images[:1])  # the same graph at batch 1
    scale = max(float(np.abs(reference_scores).max()), abs(threshold or 0.0), 1e-6)
    score_error = float(np.max(np.abs(scores - reference_scores)) / scale)
    batch_one_error = float(np.max(np.abs(single_score - reference_scores[:1])) / scale)
    map_scale = max(float(np.abs(reference_maps).max()), 1e-6)
    map_error = float(np.max(np.abs(maps - reference_maps)) / map_scale)
    decisions_identical = None
    if threshold is not None:
        decisions_identical = bool(np.all((scores >= threshold) == (reference_scores >= threshold)))
    report = {
        "images": len(images),
        "score_max_relative_error": score_error,
        "score_batch1_relative_error": batch_one_error,
        "map_max_relative_error": map_error,
        "decisions_identical": decisions_identical,
        "score_tolerance": SCORE_RELATIVE_TOLERANCE,
        "map_tolerance": MAP_RELATIVE_TOLERANCE,
    }
    failures = []
    if max(score_error, batch_one_error) > SCORE_RELATIVE_TOLERANCE:
        failures.append(
            f"score relative error {max(score_error, batch_one_error):.3g} > {SCORE_RELATIVE_TOLERANCE}"
        )
    if map_error > MAP_RELATIVE_TOLERANCE:
        failures.append(f"map relative error {map_error:.3g} > {MAP_RELATIVE_TOLERANCE}")
    if decisions_identical is False:
        failures.append(f"decisions at threshold {threshold} differ from ONNX Runtime")
    logger.info("engine parity: %s", report)
    if failures:
        raise EngineParityError("TensorRT engine failed its parity check: " + "; ".join(failures))
    return report


def build_engine(
    model_dir: Path,
    *,
    max_batch: int = 32,
    fp16: bool = True,
    workspace_gb: float = 4.0,
    force: bool = False,
) -> Path:
    """Build (or reuse) the engine for this GPU and TensorRT version; returns the plan's path.

    The plan is written to a temporary file, checked against ONNX Runtime, and renamed into
    `MODEL_DIR/engines/` only if the check passes. A JSON file beside it records the build and the check.
    """
    info = read_model_dir(model_dir)
    import_tensorrt()
    if not tensorrt_available():
        raise TensorRTUnavailable("no CUDA GPU is visible: TensorRT engines are built on the GPU that serves")
    gpu, version = gpu_name(), tensorrt_version()
    name = engine_filename(gpu, version, max_batch)
    plan_path = info.engines_dir / name
    if plan_path.is_file() and not force:
        logger.info("engine %s already built (use --force to rebuild)", plan_path)
        return plan_path
    images = load_parity_images(info.path)
    builder = EngineBuilder(
        info.onnx_path,
        max_batch=max_batch,
        fp16=fp16,
        workspace_gb=workspace_gb,
        timing_cache=info.engines_dir / TIMING_CACHE_FILE,
    )
    plan = builder.build()
    info.engines_dir.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=info.engines_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(plan)
        with TensorRTRunner(Path(temporary)) as runner:
            parity = check_engine_parity(runner, info.onnx_path, images, info.threshold)
        record = {
            "gpu": gpu,
            "tensorrt": version,
            "max_batch": max_batch,
            "fp16": fp16,
            "fp32_layer_scopes": list(FP32_LAYER_SCOPES),
            "onnx_sha256": file_sha256(info.onnx_path),
            "parity": parity,
        }
        _atomic_write_bytes(
            plan_path.with_name(plan_path.name + ".json"), (json.dumps(record, indent=2) + "\n").encode()
        )
        os.replace(temporary, plan_path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    logger.info("saved %s", plan_path)
    return plan_path
