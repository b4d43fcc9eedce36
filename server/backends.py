"""Inference backends: the exported graph run by TensorRT or ONNX Runtime (CUDA or CPU).

Every backend has the same small interface (`Backend`). A backend is created, warmed up, used and
closed on ONE thread (the model's batcher thread), so its session or execution context is never shared.
`create_backend("auto", ...)` picks TensorRT when it imports and a GPU is present, else ONNX Runtime on
CUDA when that provider is available, else ONNX Runtime on the CPU, and logs what it picked and why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from efficientad.errors import UserError
from efficientad.model_dir import INPUT_NAME, OUTPUT_NAMES, ModelInfo, find_engine
from server.config import BackendKind, Settings, usable_cpus

logger = logging.getLogger(__name__)

ORT_PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


class BackendError(UserError):
    """A backend that cannot run here (provider missing, engine unusable, ...), named in the message."""


class Backend(Protocol):
    name: str  # "tensorrt", "onnxruntime-cuda" or "onnxruntime-cpu"

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, H, W) uint8 RGB -> (anomaly maps (N, 1, H, W) float32, scores (N,) float32)."""
        ...

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Run each batch size once so the first real request pays no allocation or tuning cost."""
        ...

    def close(self) -> None: ...


def warmup_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes warmed up before ready: powers of two below the max, plus the max (1, 2, 4, 8, 16)."""
    sizes = [1 << power for power in range(max_batch_size.bit_length()) if (1 << power) < max_batch_size]
    return [*sizes, max_batch_size]


def _warmup(backend: Backend, height: int, width: int, batch_sizes: Sequence[int]) -> None:
    generator = np.random.default_rng(0)
    for size in batch_sizes:
        images = generator.integers(0, 256, size=(size, 3, height, width), dtype=np.uint8)  # (size, 3, H, W)
        backend.infer(images)
    logger.info("%s warmed up for batch sizes %s", backend.name, list(batch_sizes))


class OnnxRuntimeBackend:
    """model.onnx on ONNX Runtime with exactly one provider (CUDA or CPU); never a silent fallback."""

    def __init__(
        self, model: ModelInfo, *, device: str = "cpu", intra_op_threads: int = 0, spinning: bool = False
    ) -> None:
        import onnxruntime as ort

        if device not in ORT_PROVIDERS:
            raise BackendError(f"ONNX Runtime device must be 'cuda' or 'cpu', got {device!r}")
        self.name = f"onnxruntime-{device}"
        self.model = model
        provider = ORT_PROVIDERS[device]
        available = ort.get_available_providers()
        if provider not in available:
            raise BackendError(
                f"{self.name}: {provider} is not available in this onnxruntime build (available: "
                f"{', '.join(available)}); install onnxruntime-gpu for CUDA or use --backend onnxruntime-cpu"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if device == "cpu":
            options.intra_op_num_threads = intra_op_threads or usable_cpus()
            # a spinning thread burns 2 ms of CPU per request here, on the cores decode and HTTP need
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        providers: list[Any] = [provider] if device == "cpu" else [provider, "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(
                str(model.onnx_path), sess_options=options, providers=providers
            )
        except Exception as error:  # onnxruntime raises its own exception types
            raise BackendError(f"{self.name}: cannot load {model.onnx_path}: {error}") from None
        active = self.session.get_providers()
        if not active or active[0] != provider:
            raise BackendError(
                f"{self.name}: asked for {provider} but the session runs on {active} (CUDA libraries "
                "missing or not matching this onnxruntime build?); refusing to fall back silently"
            )
        self._check_signature()
        logger.info(
            "%s: loaded %s (providers %s, intra-op threads %s)",
            self.name,
            model.onnx_path,
            active,
            options.intra_op_num_threads if device == "cpu" else "-",
        )

    def _check_signature(self) -> None:
        inputs = {node.name: node for node in self.session.get_inputs()}
        outputs = {node.name for node in self.session.get_outputs()}
        if INPUT_NAME not in inputs or inputs[INPUT_NAME].type != "tensor(uint8)":
            found = {name: node.type for name, node in inputs.items()}
            raise BackendError(
                f"{self.model.onnx_path}: expected a uint8 input {INPUT_NAME!r}, found {found}"
            )
        missing = [name for name in OUTPUT_NAMES if name not in outputs]
        if missing:
            raise BackendError(f"{self.model.onnx_path}: outputs {missing} missing (found {sorted(outputs)})")

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8)  # (N, 3, H, W)
        maps, scores = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return maps.astype(np.float32, copy=False), scores.astype(np.float32, copy=False)  # (N,1,H,W), (N,)

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        _warmup(self, self.model.input_height, self.model.input_width, batch_sizes)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


class TensorRTBackend:
    """A TensorRT engine for this GPU (MODEL_DIR/engines, built by `efficientad engine`) and one runner.

    The runner (`server.tensorrt_runner`) owns one execution context and one CUDA stream; it is created,
    used and closed on the thread that creates this backend (the model's batcher thread).
    """

    name = "tensorrt"

    def __init__(self, model: ModelInfo, *, max_batch_size: int) -> None:
        usable, why = _tensorrt_usable()
        if not usable:
            raise BackendError(f"tensorrt: not usable here: {why}")
        from server.tensorrt_runner import TensorRTRunner

        self.model = model
        self.engine_path = find_cached_engine(model, max_batch_size)
        self.runner = TensorRTRunner(self.engine_path)
        self.runner.__enter__()
        logger.info("tensorrt: loaded %s", self.engine_path)

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.runner.infer(np.ascontiguousarray(images, dtype=np.uint8))

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        _warmup(self, self.model.input_height, self.model.input_width, batch_sizes)

    def close(self) -> None:
        self.runner.__exit__(None, None, None)


def find_cached_engine(model: ModelInfo, max_batch_size: int) -> Path:
    """The cached engine for this GPU + TensorRT version (max batch >= ours); BackendError without one.

    The server loads engines; building one is `efficientad engine`'s job (the Docker entrypoint runs it
    before the server starts), so serving never imports the exporter.
    """
    from server.tensorrt_runner import gpu_name, tensorrt_version

    gpu, version = gpu_name(), tensorrt_version()
    cached = find_engine(model.path, gpu, version, max_batch_size)
    if cached is None:
        raise BackendError(
            f"tensorrt: no engine for {gpu}, TensorRT {version}, max batch >= {max_batch_size} in "
            f"{model.engines_dir}: build it with `efficientad engine {model.path} --max-batch "
            f"{max_batch_size}`"
        )
    logger.info("tensorrt: using the cached engine %s", cached)
    return cached


def _tensorrt_usable() -> tuple[bool, str]:
    try:
        from server import tensorrt_runner
    except ImportError as error:
        return False, f"server.tensorrt_runner does not import ({error})"
    try:
        if tensorrt_runner.tensorrt_available():
            return True, f"TensorRT imports and a GPU is present ({tensorrt_runner.gpu_name()})"
    except Exception as error:  # a broken CUDA install shows up here; auto moves on
        return False, f"TensorRT check failed ({type(error).__name__}: {error})"
    return False, "the tensorrt package or a CUDA GPU is missing"


def _ort_cuda_usable() -> tuple[bool, str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if ORT_PROVIDERS["cuda"] in available:
        return True, "onnxruntime has the CUDAExecutionProvider"
    return False, f"onnxruntime has no CUDAExecutionProvider (providers: {', '.join(available)})"


def check_backend_available(kind: BackendKind) -> None:
    """BackendError now (not after loading) when an explicitly named backend cannot run on this machine."""
    if kind == "tensorrt":
        usable, why = _tensorrt_usable()
    elif kind == "onnxruntime-cuda":
        usable, why = _ort_cuda_usable()
    else:
        return
    if not usable:
        raise BackendError(f"--backend {kind} cannot run here: {why} (use --backend auto or onnxruntime-cpu)")


def _build(kind: BackendKind, model: ModelInfo, settings: Settings) -> Backend:
    if kind == "tensorrt":
        return TensorRTBackend(model, max_batch_size=settings.max_batch_size)
    if kind == "onnxruntime-cuda":
        return OnnxRuntimeBackend(model, device="cuda")
    if kind == "onnxruntime-cpu":
        return OnnxRuntimeBackend(
            model,
            device="cpu",
            intra_op_threads=settings.intra_op_threads,
            spinning=settings.intra_op_spinning,
        )
    raise BackendError(f"unknown backend {kind!r}: use auto, tensorrt, onnxruntime-cuda or onnxruntime-cpu")


def create_backend(kind: BackendKind, model: ModelInfo, settings: Settings) -> Backend:
    """The backend `kind` for `model`; `auto` tries TensorRT, then ONNX Runtime CUDA, then CPU (logged)."""
    if kind != "auto":
        return _build(kind, model, settings)
    reasons = []
    for candidate, usable in (("tensorrt", _tensorrt_usable), ("onnxruntime-cuda", _ort_cuda_usable)):
        ok, why = usable()
        if ok:
            try:
                backend = _build(candidate, model, settings)  # type: ignore[arg-type]
            except Exception as error:
                logger.warning(
                    "backend auto: %s looked usable (%s) but failed: %s; trying the next",
                    candidate,
                    why,
                    error,
                )
                reasons.append(f"{candidate} failed: {error}")
                continue
            logger.info("backend auto -> %s for model %s: %s", candidate, model.name, why)
            return backend
        reasons.append(f"not {candidate}: {why}")
    logger.info("backend auto -> onnxruntime-cpu for model %s: %s", model.name, "; ".join(reasons))
    return _build("onnxruntime-cpu", model, settings)
