"""The FastAPI app: `create_app(settings)` builds it; its lifespan starts and stops the serving state.

The parts: server.state (models, readiness, reload), server.routes (the handlers), server.errors (error
answers), server.access (access log and request metrics), server.ui (the operator page).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.access import AccessLogMiddleware
from server.backends import create_backend
from server.config import Settings
from server.errors import ApiError, add_error_handlers
from server.logs import configure_logging
from server.routes import router
from server.state import BackendFactory, ReloadFailed, ServedModel, ServingState
from server.ui import mount_operator_page

__all__ = [
    "ApiError",
    "ReloadFailed",
    "ServedModel",
    "ServingState",
    "create_app",
    "create_app_from_environment",
]

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, backend_factory: BackendFactory | None = None) -> FastAPI:
    """The app for `settings` (default: from EAD_* variables). `backend_factory` replaces `create_backend`."""
    settings = settings if settings is not None else Settings()
    state = ServingState(settings, backend_factory or create_backend)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()

        def on_sighup() -> None:
            logger.info("SIGHUP: reloading every model")
            task = loop.create_task(state.reload_all())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        try:  # only in the main thread of the process (not where tests run the app in a thread)
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
            listening = True
        except (RuntimeError, ValueError, NotImplementedError):
            listening = False
        try:
            yield
        finally:
            if listening:
                loop.remove_signal_handler(signal.SIGHUP)
            await state.stop()

    app = FastAPI(
        title="EfficientAD anomaly detection",
        version="0.1.0",
        description="Score images for anomalies with an exported EfficientAD model.",
        lifespan=lifespan,
    )
    app.state.serving = state
    add_error_handlers(app)
    app.add_middleware(AccessLogMiddleware, metrics=state.metrics)
    app.include_router(router)
    mount_operator_page(app)
    return app


def create_app_from_environment() -> FastAPI:
    """uvicorn's app factory for `--workers N`: settings from EAD_* and logging set up as by the CLI."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)
