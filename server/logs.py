"""Logging for the server: JSON lines (one object per record) or plain text, and one access line per request.

Access lines carry route, status, model and milliseconds; never headers, bodies or keys.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

ACCESS_LOGGER = "efficientad.access"
ACCESS_FIELDS = ("method", "route", "path", "status", "model", "images", "ms")
_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One compact JSON object per line (orjson: a sixth of the standard library's time on an access
    line): time, level, logger, message, and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(document, default=str).decode()


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...` with the access fields appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = [f"{key}={record.__dict__[key]}" for key in ACCESS_FIELDS if key in record.__dict__]
        return f"{text} {' '.join(extras)}" if extras else text


def configure_logging(level: str = "INFO", log_format: str = "json") -> None:
    """Send the root logger (and uvicorn's) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers[:] = []
        uvicorn_logger.propagate = True
    uvicorn_access = logging.getLogger("uvicorn.access")  # replaced by our access line (no query strings)
    uvicorn_access.handlers[:] = []
    uvicorn_access.propagate = False


def log_access(
    method: str, route: str, path: str, status: int, model: str | None, images: int, ms: float
) -> None:
    logging.getLogger(ACCESS_LOGGER).info(
        "%s %s %d %.1f ms",
        method,
        path,
        status,
        ms,
        extra={
            "method": method,
            "route": route,
            "path": path,
            "status": status,
            "model": model,
            "images": images,
            "ms": round(ms, 2),
        },
    )
