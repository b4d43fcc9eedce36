"""Error answers: `ApiError` (status, a short code, a message) and the app's handlers that turn it, bad
parameters, unknown routes and anything unexpected into the same `{"error", "detail"}` JSON body."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP error answer: status, a short code and a message for the client."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


async def _api_error(_request: Any, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return error_response(error.status, error.code, error.detail, error.headers)


async def _validation_error(_request: Any, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = []
    for problem in error.errors():
        where = ".".join(
            str(part) for part in problem.get("loc", ()) if part not in ("query", "path", "body")
        )
        got = (
            f" (got {problem['input']!r})"
            if "input" in problem and not isinstance(problem["input"], dict)
            else ""
        )
        problems.append(f"{where}: {problem.get('msg', 'invalid')}{got}")
    return error_response(422, "invalid_parameter", "; ".join(problems) or "invalid request parameters")


async def _http_error(_request: Any, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(
        error.status_code,
        codes.get(error.status_code, "http_error"),
        str(error.detail),
        dict(error.headers or {}),
    )


async def _unexpected_error(_request: Any, error: Exception) -> JSONResponse:
    logger.error("unhandled %s: %s", type(error).__name__, error)
    return error_response(500, "internal_error", "internal server error (see the server log)")


def add_error_handlers(app: FastAPI) -> None:
    """Every error the app answers, as `{"error": code, "detail": message}` with its status."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
