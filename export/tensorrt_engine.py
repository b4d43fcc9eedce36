"""TensorRT 10: build an FP16 engine from `model.onnx`, check it against ONNX Runtime, and run it.

Torch-free (numpy, tensorrt, cuda-python): the server imports this module. Nothing here imports tensorrt
or cuda-python at import time; `tensorrt_available()` says whether both are there and a GPU is visible.

    EngineBuilder   model.onnx -> serialised plan (explicit batch, profile 1..max_batch on `image`, FP16,
                    the `/map_head/` layers kept in FP32, timing cache on disk)
    TensorRTRunner  context manager: one deserialised engine, one execution context, one CUDA stream,
                    device buffers and pinned host buffers for max_batch; infer(uint8 images) -> maps, scores
    build_engine    builder + FP16 parity check against ONNX Runtime; saves the plan only if it passes

Every TensorRT and CUDA call's result is checked; errors name the call and the tensor.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import numpy as np

from efficientad.errors import UserError
from export.model_dir import (
    INPUT_NAME,
    OUTPUT_NAMES,
    engine_filename,
    file_sha256,
    read_model_dir,
)

logger = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10
WEAKLY_TYPED_TENSORRT_MAJOR = 10  # FP16 flag + per-layer precision exist up to 10.x (removed in 11)
TIMING_CACHE_FILE = "timing.cache"
PARITY_IMAGES_FILE = "parity_images.npy"  # written by the exporter: (N, 3, H, W) uint8 real images
FP32_LAYER_SCOPES = ("/map_head/",)  # distances, quantile normalisation, pad, resize, reduce-max
SCORE_RELATIVE_TOLERANCE = 0.02  # |score_trt - score_ort| <= 2% of max(|score_ort|, threshold)
MAP_RELATIVE_TOLERANCE = 0.05  # max |map diff| <= 5% of the map's largest magnitude


class TensorRTUnavailable(UserError):
    """TensorRT 10 or cuda-python is not installed, or no CUDA GPU is visible."""


class TensorRTError(RuntimeError):
    """A TensorRT or CUDA call failed; the message names the call and the tensor."""


class EngineParityError(UserError):
    """The FP16 engine's scores or decisions differ from ONNX Runtime's: the engine is not saved."""


# ---------------------------------------------------------------------------------------------- imports


def _import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({error}): `efficientad engine` needs TensorRT {MIN_TENSORRT_MAJOR}+ "
            "and a CUDA GPU (pip install 'efficientad[gpu]'); without it, serve with ONNX Runtime"
        ) from None
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailable(
            f"TensorRT {tensorrt.__version__} is too old: version >= {MIN_TENSORRT_MAJOR} needed"
        )
    return tensorrt


def _import_cudart() -> ModuleType:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as error:
            raise TensorRTUnavailable(
                f"cuda-python is not installed ({error}): pip install 'cuda-python' (the gpu extra)"
            ) from None
    return cudart


def tensorrt_available() -> bool:
    """True when TensorRT >= 10 and cuda-python import and at least one CUDA GPU is visible."""
    try:
        _import_tensorrt()
        cudart = _import_cudart()
        error, count = cudart.cudaGetDeviceCount()
    except (TensorRTUnavailable, OSError, RuntimeError):
        return False
    return error == cudart.cudaError_t.cudaSuccess and count > 0


def _make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that forwards to `logging` and keeps the errors, so exceptions can quote them."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, message: str) -> None:
            levels = trt.ILogger.Severity
            if severity in (levels.INTERNAL_ERROR, levels.ERROR):
                self.errors.append(message)
                logger.error("TensorRT: %s", message)
            elif severity == levels.WARNING:
                logger.warning("TensorRT: %s", message)
            else:
                logger.debug("TensorRT: %s", message)

        def recent_errors(self) -> str:
            return "; ".join(self.errors[-5:]) or "TensorRT logged no error"

    return Logger()


# ------------------------------------------------------------------------------------------------- CUDA


class Cuda:
    """cuda-python's runtime API with every result checked: `cuda.call("cudaMalloc", nbytes, what="...")`."""

    def __init__(self) -> None:
        self.runtime = _import_cudart()

    def call(self, name: str, *args: Any, what: str = "") -> Any:
        result = getattr(self.runtime, name)(*args)
        error, values = result[0], result[1:]
        if error != self.runtime.cudaError_t.cudaSuccess:
            _, text = self.runtime.cudaGetErrorString(error)
            detail = text.decode() if isinstance(text, bytes) else str(text)
            raise TensorRTError(
                f"{name} failed{f' for {what}' if what else ''}: {getattr(error, 'name', error)} ({detail})"
            )
        if not values:
            return None
        return values[0] if len(values) == 1 else values


def gpu_name(device: int = 0) -> str:
    """The CUDA device's name, e.g. "NVIDIA H100 80GB HBM3"."""
    properties = Cuda().call("cudaGetDeviceProperties", device, what=f"device {device}")
    name = properties.name
    return (name.decode() if isinstance(name, bytes) else str(name)).split("\x00", 1)[0].strip()


class PinnedBuffer:
    """Page-locked host memory viewed as a numpy array (fast, asynchronous copies to and from the GPU)."""

    def __init__(self, cuda: Cuda, shape: tuple[int, ...], dtype: np.dtype, what: str):
        self.cuda, self.what = cuda, what
        self.nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.pointer = int(cuda.call("cudaMallocHost", self.nbytes, what=f"pinned host buffer of {what!r}"))
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.pointer)
        self.array = np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape)

    def free(self) -> None:
        if self.pointer:
            self.array = None  # type: ignore[assignment]
            pointer, self.pointer = self.pointer, 0
            self.cuda.call("cudaFreeHost", pointer, what=f"pinned host buffer of {self.what!r}")


class DeviceBuffer:
    """GPU memory for one tensor at its largest shape."""

    def __init__(self, cuda: Cuda, nbytes: int, what: str):
        self.cuda, self.what, self.nbytes = cuda, what, int(nbytes)
        self.pointer = int(cuda.call("cudaMalloc", self.nbytes, what=f"device buffer of {what!r}"))

    def free(self) -> None:
        if self.pointer:
            pointer, self.pointer = self.pointer, 0
            self.cuda.call("cudaFree", pointer, what=f"device buffer of {self.what!r}")


class CudaStream:
    def __init__(self, cuda: Cuda):
        self.cuda = cuda
        self.stream = cuda.call(
            "cudaStreamCreateWithFlags", cuda.runtime.cudaStreamNonBlocking, what="stream"
        )
        self.handle = int(self.stream)

    def copy_to_device(self, device: DeviceBuffer, host: PinnedBuffer, nbytes: int) -> None:
        kind = self.cuda.runtime.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.cuda.call(
            "cudaMemcpyAsync", device.pointer, host.pointer, nbytes, kind, self.stream, what=device.what
        )

    def copy_to_host(self, host: PinnedBuffer, device: DeviceBuffer, nbytes: int) -> None:
        kind = self.cuda.runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.cuda.call(
            "cudaMemcpyAsync", host.pointer, device.pointer, nbytes, kind, self.stream, what=device.what
        )

    def synchronize(self) -> None:
        self.cuda.call("cudaStreamSynchronize", self.stream, what="stream")

    def destroy(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            self.cuda.call("cudaStreamDestroy", stream, what="stream")


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
        self.trt = _import_tensorrt()
        major = int(str(self.trt.__version__).split(".")[0])
        if fp16 and major > WEAKLY_TYPED_TENSORRT_MAJOR:
            raise TensorRTUnavailable(
                f"TensorRT {self.trt.__version__} has no FP16 builder flag (11.x builds strongly typed "
                "networks only): for an FP16 engine install TensorRT 10 (pip install 'tensorrt>=10,<11'), "
                "or build FP32 with --no-fp16"
            )
        self.trt_logger = _make_logger(self.trt)

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


# -------------------------------------------------------------------------------------------------- run


class TensorRTRunner:
    """One engine, one execution context, one stream: uint8 (N,3,H,W) -> maps (N,1,H,W), scores (N,)."""

    def __init__(self, plan_path: Path):
        self.plan_path = Path(plan_path)
        self.trt = _import_tensorrt()
        self.cuda = Cuda()
        self._opened = False

    # life cycle ----------------------------------------------------------------------------------------
    def __enter__(self) -> TensorRTRunner:
        trt = self.trt
        self._buffers: list[PinnedBuffer | DeviceBuffer] = []
        self.stream: CudaStream | None = None
        try:
            self.trt_logger = _make_logger(trt)
            self.runtime = trt.Runtime(self.trt_logger)
            if self.runtime is None:
                raise TensorRTError("trt.Runtime could not be created")
            self.engine = self.runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if self.engine is None:
                raise TensorRTError(
                    f"cannot deserialise {self.plan_path} (corrupt, or built for another GPU or TensorRT): "
                    f"{self.trt_logger.recent_errors()}"
                )
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise TensorRTError(f"create_execution_context failed for {self.plan_path}")
            self._bind()
        except BaseException:
            with contextlib.suppress(TensorRTError):  # keep the original error
                self._release()
            raise
        self._opened = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._release()

    def _release(self) -> None:
        """Free in reverse order of creation; every step runs, the first failure is raised at the end."""
        self._opened = False
        steps = []
        if getattr(self, "stream", None) is not None:
            steps += [self.stream.synchronize, self.stream.destroy]
        steps += [buffer.free for buffer in reversed(getattr(self, "_buffers", []))]
        first_error: Exception | None = None
        for step in steps:
            try:
                step()
            except TensorRTError as error:
                first_error = first_error or error
        self.stream = None
        self._buffers = []
        self.context = None
        self.engine = None
        if first_error is not None:
            raise first_error

    # setup ---------------------------------------------------------------------------------------------
    def _bind(self) -> None:
        trt, engine = self.trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted([INPUT_NAME, *OUTPUT_NAMES]):
            raise TensorRTError(f"engine tensors are {names}, expected {[INPUT_NAME, *OUTPUT_NAMES]}")
        if engine.get_tensor_mode(INPUT_NAME) != trt.TensorIOMode.INPUT:
            raise TensorRTError(f"tensor {INPUT_NAME!r} is not an engine input")
        minimum, _optimum, maximum = engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.max_batch = int(maximum[0])
        self.min_batch = int(minimum[0])
        self.channels, self.height, self.width = (int(v) for v in tuple(maximum)[1:])
        if self.channels != 3:
            raise TensorRTError(f"tensor {INPUT_NAME!r} has {self.channels} channels, expected 3")
        self.stream = CudaStream(self.cuda)
        if not self.context.set_input_shape(INPUT_NAME, tuple(maximum)):
            raise TensorRTError(f"set_input_shape({INPUT_NAME!r}, {tuple(maximum)}) failed")
        self.host: dict[str, PinnedBuffer] = {}
        self.device: dict[str, DeviceBuffer] = {}
        for name in [INPUT_NAME, *OUTPUT_NAMES]:
            shape = tuple(int(v) for v in self.context.get_tensor_shape(name))
            if any(v < 0 for v in shape):
                raise TensorRTError(f"tensor {name!r} has an unresolved shape {shape} at max batch")
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            expected = np.uint8 if name == INPUT_NAME else np.float32
            if dtype != expected:
                raise TensorRTError(f"tensor {name!r} has dtype {dtype}, expected {np.dtype(expected)}")
            self.host[name] = PinnedBuffer(self.cuda, shape, dtype, name)
            self._buffers.append(self.host[name])
            self.device[name] = DeviceBuffer(self.cuda, self.host[name].nbytes, name)
            self._buffers.append(self.device[name])
            if not self.context.set_tensor_address(name, self.device[name].pointer):
                raise TensorRTError(f"set_tensor_address failed for tensor {name!r}")

    # inference -----------------------------------------------------------------------------------------
    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, H, W) uint8 RGB, N <= max_batch -> copies of (maps (N, 1, H, W), scores (N,)) float32."""
        if not self._opened:
            raise TensorRTError("TensorRTRunner used outside its `with` block")
        images = np.asarray(images)
        expected = (self.channels, self.height, self.width)
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"tensor {INPUT_NAME!r} must be uint8 (N, {', '.join(map(str, expected))}), "
                f"got {images.dtype} {images.shape}"
            )
        count = images.shape[0]
        if not self.min_batch <= count <= self.max_batch:
            raise ValueError(
                f"batch of {count} is outside the engine's profile {self.min_batch}..{self.max_batch}"
            )
        shape = (count, *expected)
        if not self.context.set_input_shape(INPUT_NAME, shape):
            raise TensorRTError(f"set_input_shape({INPUT_NAME!r}, {shape}) failed")
        self.host[INPUT_NAME].array[:count] = images
        stream = self.stream
        stream.copy_to_device(self.device[INPUT_NAME], self.host[INPUT_NAME], images.nbytes)
        if not self.context.execute_async_v3(stream.handle):
            raise TensorRTError(
                f"execute_async_v3 failed for a batch of {count} on tensor {INPUT_NAME!r}: "
                f"{self.trt_logger.recent_errors()}"
            )
        results = []
        for name in OUTPUT_NAMES:
            rows = self.host[name].array[:count]
            stream.copy_to_host(self.host[name], self.device[name], rows.nbytes)
            results.append(rows)
        stream.synchronize()
        anomaly_map, score = (np.array(rows, copy=True) for rows in results)
        return anomaly_map, score


# ------------------------------------------------------------------------------------------ build + check


def tensorrt_version() -> str:
    return str(_import_tensorrt().__version__)


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
    _import_tensorrt()
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
