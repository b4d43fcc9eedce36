"""Reading a request's images: the raw body (one image) or each file of a multipart form.

Refuses by Content-Type (415) and by Content-Length (413) before reading, again while streaming (413),
a body that does not arrive within its time (408, connection closed), a malformed multipart body (400).
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from server.errors import ApiError
from server.imaging import SUPPORTED_CONTENT_TYPES, normalise_content_type

logger = logging.getLogger(__name__)

SNIFFED_CONTENT_TYPES = ("", "application/octet-stream")
MULTIPART = "multipart/form-data"
MAX_FILES_PER_REQUEST = 256

Upload = tuple[str | None, bytes, str | None]  # (file name or None for a raw body, bytes, content type)


async def read_images(request: Request, limit: int, *, max_files: int, timeout_s: float) -> list[Upload]:
    """The request's images as (filename, bytes, content type): the raw body or each multipart file."""
    raw_type = request.headers.get("content-type")
    media_type = normalise_content_type(raw_type)
    if (
        media_type != MULTIPART
        and media_type not in SUPPORTED_CONTENT_TYPES
        and media_type not in SNIFFED_CONTENT_TYPES
    ):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"unsupported Content-Type {raw_type!r}: send one of "
            f"{', '.join(SUPPORTED_CONTENT_TYPES)} or {MULTIPART}",
        )
    body = await _read_body(request, limit, timeout_s)
    if media_type != MULTIPART:
        return [(None, body, raw_type)]
    return await _multipart_files(request, body, max_files)


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refusing (413) by Content-Length before reading, and again while streaming.

    A body that has not all arrived within `timeout_s` is refused (408) and its connection closed: a
    client that stops sending mid-body holds nothing for longer than that. A client that disconnects
    mid-body is logged at INFO (it is the client's doing, not a server error) and answered 499, which
    only the access log and the metrics see.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise ApiError(413, "body_too_large", f"the body is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "body_too_large", f"the body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408,
            "body_timeout",
            f"the body did not arrive within {timeout_s:g} s ({size} bytes came); the connection is closed",
            {"Connection": "close"},
        ) from None
    except ClientDisconnect:
        logger.info("client disconnected during the upload, after %d bytes of the body", size)
        raise ApiError(499, "client_disconnected", "the client disconnected during the upload") from None
    return b"".join(chunks)


async def _multipart_files(request: Request, body: bytes, max_files: int) -> list[Upload]:
    """Every file part (any field name) as (filename, bytes, content type); text fields are ignored."""

    async def replay() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(
        request.headers, replay(), max_files=max_files, max_fields=100, max_part_size=1 << 20
    )
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {error.message}") from None
    try:
        files = []
        for field_name, value in form.multi_items():
            if isinstance(value, UploadFile):
                filename = value.filename or field_name
                files.append((filename, await value.read(), _part_content_type(value)))
    finally:
        await form.close()
    if not files:
        raise ApiError(400, "empty_body", "the multipart body has no file parts")
    return files


def _part_content_type(upload: UploadFile) -> str | None:
    """The part's Content-Type, or one guessed from its file name when the part says nothing useful."""
    declared = normalise_content_type(upload.content_type)
    if declared and declared not in SNIFFED_CONTENT_TYPES:
        return upload.content_type
    guessed = mimetypes.guess_type(upload.filename or "")[0]
    return guessed or None
