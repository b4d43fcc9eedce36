"""TensorRT 10 at serving time: load a serialised engine (`.plan`) and run it.

Torch-free (numpy, tensorrt, cuda-python), and part of the server so that serving never imports the
exporter. Nothing here imports tensorrt or cuda-python at import time; `tensorrt_available()` says whether
both are there and a GPU is visible. Building an engine from `model.onnx` (and its FP16 parity check) is
`export.tensorrt_engine`, which re-exports every name here.

    TensorRTRunner  context manager: one deserialised engine, one execution context, one CUDA stream,
                    device buffers and pinned host buffers for max_batch; infer(uint8 images) -> maps, scores
    gpu_name, tensorrt_version, tensorrt_available
                    what the engine cache is keyed on (see `efficientad.model_dir.find_engine`)

Every TensorRT and CUDA call's result is checked; errors name the call and the tensor.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import numpy as np

from efficientad.errors import UserError
from efficientad.model_dir import INPUT_NAME, OUTPUT_NAMES

__all__ = [
    "MIN_TENSORRT_MAJOR",
    "Cuda",
    "CudaStream",
    "DeviceBuffer",
    "PinnedBuffer",
    "TensorRTError",
    "TensorRTRunner",
    "TensorRTUnavailable",
    "gpu_name",
    "tensorrt_available",
    "tensorrt_version",
]

logger = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10


class TensorRTUnavailable(UserError):
    """TensorRT 10 or cuda-python is not installed, or no CUDA GPU is visible."""


class TensorRTError(RuntimeError):
    """A TensorRT or CUDA call failed; the message names the call and the tensor."""


# ---------------------------------------------------------------------------------------------- imports


def import_tensorrt() -> ModuleType:
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
        import_tensorrt()
        cudart = _import_cudart()
        error, count = cudart.cudaGetDeviceCount()
    except (TensorRTUnavailable, OSError, RuntimeError):
        return False
    return error == cudart.cudaError_t.cudaSuccess and count > 0


def make_logger(trt: ModuleType) -> Any:
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


# -------------------------------------------------------------------------------------------------- run


class TensorRTRunner:
    """One engine, one execution context, one stream: uint8 (N,3,H,W) -> maps (N,1,H,W), scores (N,)."""

    def __init__(self, plan_path: Path):
        self.plan_path = Path(plan_path)
        self.trt = import_tensorrt()
        self.cuda = Cuda()
        self._opened = False

    # life cycle ----------------------------------------------------------------------------------------
    def __enter__(self) -> TensorRTRunner:
        trt = self.trt
        self._buffers: list[PinnedBuffer | DeviceBuffer] = []
        self.stream: CudaStream | None = None
        try:
            self.trt_logger = make_logger(trt)
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


def tensorrt_version() -> str:
    return str(import_tensorrt().__version__)
