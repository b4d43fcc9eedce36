"""The serving state: the models served by name, readiness, and reload.

Startup: for each model dir, read it, create its backend on the model's own worker thread, warm up the
batch sizes 1, 2, 4, ... and max_batch_size on that thread, start its batcher; then ready.
Reload (POST /v1/models/{name}/reload, or SIGHUP for all): the same for the model's dir into a new
ServedModel, swapped in at once; requests that already hold the old one finish on it, then it is closed.
A dir that fails to load or warm up leaves the old model serving.
Shutdown (after uvicorn has stopped accepting and finished in-flight requests): not ready, each batcher
finishes its queue, each backend is closed on its thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficientad.errors import UserError
from efficientad.model_dir import ModelInfo, read_model_dir
from server.backends import Backend, warmup_batch_sizes
from server.batcher import DynamicBatcher
from server.config import BackendKind, Settings, usable_cpus
from server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

BackendFactory = Callable[[BackendKind, ModelInfo, Settings], Backend]


@dataclass
class ServedModel:
    info: ModelInfo
    backend: Backend
    batcher: DynamicBatcher
    executor: ThreadPoolExecutor  # the one thread that creates, runs and closes the backend
    in_use: int = 0  # requests holding this model (a reload closes it once they are done)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def acquire(self) -> None:
        self.in_use += 1
        self.idle.clear()

    def release(self) -> None:
        self.in_use -= 1
        if self.in_use == 0:
            self.idle.set()


class ReloadFailed(Exception):
    """A reload that left the old model serving; the message says why. `bad_model_dir`: the dir (or
    the backend it asks for) is unusable, rather than something failing in the server."""

    def __init__(self, message: str, *, bad_model_dir: bool) -> None:
        super().__init__(message)
        self.bad_model_dir = bad_model_dir


@dataclass
class ServingState:
    """Everything the routes use: settings, models by name, readiness, metrics, the decode threads."""

    settings: Settings
    backend_factory: BackendFactory
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    models: dict[str, ServedModel] = field(default_factory=dict)
    ready: bool = False
    status_detail: str = "starting"
    decode_executor: ThreadPoolExecutor | None = None
    paths: dict[str, Path] = field(default_factory=dict)  # model dir per name (re-read by a reload)
    images_in_flight: int = 0  # images being scored (small work runs on the event loop when only one)
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _retiring: set[asyncio.Task[None]] = field(default_factory=set)  # replaced models being closed
    default_model: str = field(init=False)  # the model of /predict without ?model= (names never change)

    def __post_init__(self) -> None:
        # once, not per request: the names come from Path.resolve of each dir (system calls)
        self.default_model = self.settings.default_model_name()

    async def start(self) -> None:
        settings = self.settings
        self.decode_executor = ThreadPoolExecutor(
            max_workers=settings.decode_threads or usable_cpus(), thread_name_prefix="ead-decode"
        )
        try:
            for name, path in settings.models():
                self.paths[name] = path
                self.models[name] = await self._load(name, path)
        except BaseException:
            await self.stop()
            raise
        self.ready, self.status_detail = True, "ready"
        logger.info("ready: serving %s (default %s)", ", ".join(self.models), self.default_model)

    async def _load(self, name: str, path: Path) -> ServedModel:
        loop = asyncio.get_running_loop()
        settings = self.settings
        self.status_detail = f"loading model {name}"
        info = await asyncio.to_thread(read_model_dir, path, name=name)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ead-model-{name}")
        started = time.perf_counter()
        sizes = warmup_batch_sizes(settings.max_batch_size)
        try:
            backend = await loop.run_in_executor(
                executor, self.backend_factory, settings.backend, info, settings
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        try:
            await loop.run_in_executor(executor, backend.warmup, sizes)
        except BaseException:
            executor.submit(backend.close)
            executor.shutdown(wait=False)
            raise
        batcher = DynamicBatcher(
            backend.infer,
            executor=executor,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000,
            max_queue=settings.max_queue,
            name=name,
            metrics=self.metrics,
        )
        await batcher.start()
        self.metrics.track_model(name, info.threshold)
        logger.info(
            "model %s (version %s, %dx%d) on %s, warmed up batch sizes %s in %.1f s",
            name,
            info.version,
            info.input_width,
            info.input_height,
            backend.name,
            sizes,
            time.perf_counter() - started,
        )
        return ServedModel(info, backend, batcher, executor)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[ServedModel]:
        """`with state.use(name) as model:` the model now served under `name`, held until the block ends
        (a reload swaps in a new one meanwhile, and closes this one only after every holder is done)."""
        model = self.models[name]
        model.acquire()
        try:
            yield model
        finally:
            model.release()

    async def reload(self, name: str) -> dict[str, Any]:
        """Re-read `name`'s model dir, warm the new backend up, swap it in, retire the old one.

        ReloadFailed (the old model still serving) when the dir does not load or warm up.
        """
        async with self._reload_lock:
            old = self.models[name]
            started = time.perf_counter()
            try:
                new = await self._load(name, self.paths[name])
            except Exception as error:
                logger.error("reload of model %s failed, the old one keeps serving: %s", name, error)
                raise ReloadFailed(
                    f"{type(error).__name__}: {error}", bad_model_dir=isinstance(error, UserError)
                ) from None
            self.models[name] = new  # new requests get the new model from here on
            seconds = time.perf_counter() - started
            logger.info(
                "model %s reloaded: version %s -> %s, threshold %s -> %s, in %.1f s",
                name,
                old.info.version,
                new.info.version,
                old.info.threshold,
                new.info.threshold,
                seconds,
            )
        retiring = asyncio.create_task(self._retire(name, old), name=f"retire-{name}")
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)
        return {
            "model": name,
            "version": new.info.version,
            "previous_version": old.info.version,
            "threshold": new.info.threshold,
            "previous_threshold": old.info.threshold,
            "reload_s": round(seconds, 3),
        }

    async def reload_all(self) -> None:
        """Reload every model (SIGHUP); a failure is logged and leaves that model as it was."""
        for name in list(self.models):
            with contextlib.suppress(ReloadFailed):
                await self.reload(name)

    async def _retire(self, name: str, model: ServedModel) -> None:
        """Close a replaced model once the requests holding it are done (at most graceful_shutdown_s)."""
        try:
            await asyncio.wait_for(model.idle.wait(), self.settings.graceful_shutdown_s)
        except TimeoutError:
            logger.warning(
                "model %s: %d requests still hold the replaced model; closing it", name, model.in_use
            )
        await self._close(name, model, wait=False)

    async def _close(self, name: str, model: ServedModel, *, wait: bool) -> None:
        """Finish the model's queue, close its backend on its own thread, stop that thread."""
        await model.batcher.close(timeout_s=self.settings.graceful_shutdown_s)
        try:
            await asyncio.get_running_loop().run_in_executor(model.executor, model.backend.close)
        except Exception:
            logger.exception("closing the backend of model %s failed", name)
        model.executor.shutdown(wait=wait)

    async def stop(self) -> None:
        self.ready, self.status_detail = False, "shutting down"
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for name, model in list(self.models.items()):
            await self._close(name, model, wait=True)
        self.models.clear()
        if self.decode_executor is not None:
            self.decode_executor.shutdown(wait=True)
        logger.info("all models closed")
