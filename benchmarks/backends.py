"""The inference backends under test, each behind the same three methods.

`make_call(batch_size)` returns a no-argument function that runs one batch; inputs are prepared once,
outside the timed call. `includes_transfer` says whether host->device and device->host copies happen
inside that call (True), not at all because the input already sits on the device (False), or whether
there is no device to copy to (None, CPU backends).

Rows (where available): TensorRT FP16 (with and without copies), ONNX Runtime CUDA (with and without
copies), ONNX Runtime CPU, and what a user would otherwise pick: the PyTorch fused module in eager fp32,
and on CUDA eager fp16 (autocast) and fp16 + CUDA graphs (one graph captured per batch size).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.model_setup import BenchModel
from benchmarks.timing import CudaEventTimer, WallClockTimer

logger = logging.getLogger(__name__)

INPUT_NAME = "image"


@dataclass
class BenchBackend:
    """One backend configuration: a named row family in the report."""

    name: str  # "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu", "pytorch-eager", "pytorch-cuda-graphs"
    precision: str  # "fp32", "fp16", "fp16-autocast"
    device: str  # "cuda" | "cpu"
    includes_transfer: bool | None
    timer: WallClockTimer | CudaEventTimer
    _make_call: Callable[[np.ndarray], Callable[[], Any]] = field(repr=False)
    _close: Callable[[], None] = field(default=lambda: None, repr=False)
    notes: str = ""

    @property
    def label(self) -> str:
        suffix = {True: " +copies", False: "", None: ""}[self.includes_transfer]
        return f"{self.name} {self.precision}{suffix}"

    def make_call(self, images: np.ndarray) -> Callable[[], Any]:
        """`images`: (N, 3, H, W) uint8 on the host; the call runs the model on them once."""
        return self._make_call(images)

    def close(self) -> None:
        self._close()


# ---------------------------------------------------------------- ONNX Runtime and TensorRT (as served)


def _server_infer(backend: Any) -> Callable[[np.ndarray], Callable[[], Any]]:
    """Calls of a `server.backends` backend's `infer` on host arrays: exactly what the server runs."""

    def make_call(images: np.ndarray) -> Callable[[], Any]:
        batch = np.ascontiguousarray(images)
        return lambda: backend.infer(batch)

    return make_call


def onnxruntime_cpu(model: BenchModel, *, intra_op_threads: int = 0) -> BenchBackend:
    from server.backends import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(model.info, device="cpu", intra_op_threads=intra_op_threads)
    threads = backend.session.get_session_options().intra_op_num_threads
    return BenchBackend(
        "onnxruntime-cpu",
        "fp32",
        "cpu",
        None,
        WallClockTimer(),
        _server_infer(backend),
        backend.close,
        notes=f"intra_op_threads={threads}",
    )


def onnxruntime_cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def onnxruntime_cuda(model: BenchModel) -> list[BenchBackend]:
    """Two rows: the server's call (numpy in/out: copies inside the call) and IOBinding with the input
    already on the GPU (model only). The server backend refuses to load when the CUDA provider is listed
    but does not become active, so a CPU fallback is never mislabelled as CUDA."""
    import onnxruntime as ort

    from server.backends import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(model.info, device="cuda")
    session = backend.session
    output_names = [output.name for output in session.get_outputs()]

    def device_resident(images: np.ndarray) -> Callable[[], Any]:
        device_input = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(images), "cuda", 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, device_input)
        for name in output_names:
            binding.bind_output(name, "cuda", 0)

        def call() -> None:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return call

    return [
        BenchBackend("onnxruntime-cuda", "fp32", "cuda", False, WallClockTimer(), device_resident),
        BenchBackend(
            "onnxruntime-cuda", "fp32", "cuda", True, WallClockTimer(), _server_infer(backend), backend.close
        ),
    ]


def tensorrt_available() -> bool:
    try:
        from server.tensorrt_runner import tensorrt_available as available
    except ImportError:
        return False
    try:
        return bool(available())
    except Exception as error:  # a broken CUDA install: report and move on
        logger.warning("TensorRT check failed: %s", error)
        return False


def tensorrt(model: BenchModel, *, max_batch: int) -> list[BenchBackend]:
    """TensorRT FP16 through the server's backend (`TensorRTRunner.infer`: host arrays in and out, so the
    copies are included) and, where torch has CUDA, the same engine run on device-resident torch tensors."""
    from server.backends import TensorRTBackend

    backend = TensorRTBackend(model.info, max_batch_size=max_batch)
    rows = [
        BenchBackend(
            "tensorrt", "fp16", "cuda", True, WallClockTimer(), _server_infer(backend), backend.close
        )
    ]
    return _tensorrt_device_resident(backend.engine_path) + rows


def _tensorrt_device_resident(engine_path: Path) -> list[BenchBackend]:
    """The engine run on torch CUDA tensors (no copies), timed with CUDA events; [] without torch CUDA."""
    try:
        import tensorrt as trt
        import torch
    except ModuleNotFoundError:
        return []
    if not torch.cuda.is_available():
        return []
    trt_logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialise {engine_path}")
    context = engine.create_execution_context()
    if context is None:
        raise RuntimeError(f"TensorRT could not create an execution context for {engine_path}")
    device = torch.device("cuda", 0)
    torch_dtypes = {
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.half,
    }

    def make_call(images: np.ndarray) -> Callable[[], Any]:
        batch_input = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # (N, 3, H, W) uint8
        if not context.set_input_shape(INPUT_NAME, tuple(batch_input.shape)):
            raise RuntimeError(
                f"TensorRT rejected input shape {tuple(batch_input.shape)} for tensor {INPUT_NAME!r}"
            )
        buffers = {INPUT_NAME: batch_input}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = tuple(context.get_tensor_shape(name))
                buffers[name] = torch.empty(
                    shape, dtype=torch_dtypes[engine.get_tensor_dtype(name)], device=device
                )
        for name, tensor in buffers.items():
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise RuntimeError(f"TensorRT rejected the address of tensor {name!r}")
        stream = torch.cuda.current_stream(device)

        def call() -> None:
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")

        return call

    return [BenchBackend("tensorrt", "fp16", "cuda", False, CudaEventTimer(device), make_call)]


# ---------------------------------------------------------------- PyTorch (the baseline a user would pick)


def pytorch(model: BenchModel, *, device_name: str) -> list[BenchBackend]:
    """The fused module from the checkpoint: eager fp32; on CUDA also eager fp16 and fp16 + CUDA graphs."""
    import torch

    from export.fused import FusedEfficientAD
    from training.checkpoint import load_checkpoint

    if model.run_dir is None:
        return []
    device = torch.device(device_name)
    fused = FusedEfficientAD.from_checkpoint(load_checkpoint(model.run_dir, "cpu")).to(device).eval()
    if device.type == "cpu":
        timer: WallClockTimer | CudaEventTimer = WallClockTimer()
        return [BenchBackend("pytorch-eager", "fp32", "cpu", None, timer, _eager(fused, device, None))]
    torch.backends.cudnn.benchmark = True
    timer = CudaEventTimer(device)
    return [
        BenchBackend(
            "pytorch-cuda-graphs", "fp16-autocast", "cuda", False, timer, _cuda_graphed(fused, device)
        ),
        BenchBackend(
            "pytorch-eager", "fp16-autocast", "cuda", False, timer, _eager(fused, device, torch.float16)
        ),
        BenchBackend("pytorch-eager", "fp32", "cuda", False, timer, _eager(fused, device, None)),
    ]


def _autocast(device: Any, dtype: Any, *, cache_enabled: bool = True) -> Any:
    import torch

    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def _eager(module: Any, device: Any, dtype: Any) -> Callable[[np.ndarray], Callable[[], Any]]:
    import torch

    def make_call(images: np.ndarray) -> Callable[[], Any]:
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # (N, 3, H, W) uint8, on the device

        def call() -> Any:
            with torch.inference_mode(), _autocast(device, dtype):
                return module(batch)

        return call

    return make_call


def _cuda_graphed(module: Any, device: Any) -> Callable[[np.ndarray], Callable[[], Any]]:
    """fp16 autocast captured into one CUDA graph per batch size; the call replays it."""
    import torch

    graphs: list[Any] = []  # the current graph is kept alive here; the previous one is released

    def make_call(images: np.ndarray) -> Callable[[], Any]:
        graphs.clear()
        torch.cuda.empty_cache()
        static_input = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # (N, 3, H, W) uint8
        side_stream = torch.cuda.Stream(device)
        side_stream.wait_stream(torch.cuda.current_stream(device))
        with (
            torch.cuda.stream(side_stream),
            torch.no_grad(),
            _autocast(device, torch.float16, cache_enabled=False),
        ):
            for _ in range(3):  # warm-up on a side stream, as graph capture requires
                module(static_input)
        torch.cuda.current_stream(device).wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad(), _autocast(device, torch.float16, cache_enabled=False):
            static_outputs = module(static_input)
        graphs.append((graph, static_input, static_outputs))
        return graph.replay

    return make_call


# ---------------------------------------------------------------- selection


def available_backends(
    model: BenchModel,
    *,
    use_gpu: bool,
    max_batch: int,
    include_pytorch: bool = True,
    intra_op_threads: int = 0,
) -> list[BenchBackend]:
    """Every backend this machine can run, fastest kind first (those that cannot run are logged, skipped)."""
    backends: list[BenchBackend] = []
    cuda_torch = False
    if use_gpu:
        try:
            import torch

            cuda_torch = torch.cuda.is_available()
        except ModuleNotFoundError:
            cuda_torch = False
        if tensorrt_available():
            backends += tensorrt(model, max_batch=max_batch)
        else:
            logger.info("TensorRT rows skipped: tensorrt is not importable or sees no GPU")
        if onnxruntime_cuda_available():
            backends += onnxruntime_cuda(model)
        else:
            logger.info("ONNX Runtime CUDA rows skipped: CUDAExecutionProvider is not available")
    backends.append(onnxruntime_cpu(model, intra_op_threads=intra_op_threads))
    if include_pytorch:
        try:
            backends += pytorch(model, device_name="cuda" if cuda_torch else "cpu")
        except ModuleNotFoundError as error:
            logger.warning("PyTorch rows skipped: %s", error)
    return backends
