"""The access middleware: one log line and the request metrics per HTTP request."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.logs import log_access
from server.metrics import ServerMetrics


class AccessLogMiddleware:
    """One log line and the request metrics per HTTP request (route template, status, model, ms)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            state = scope.get("state", {})
            self.metrics.observe_request(route, status, seconds)
            log_access(
                scope["method"],
                route,
                scope["path"],
                status,
                state.get("model"),
                state.get("images", 0),
                seconds * 1000,
            )
