"""File helpers shared by every stage (torch-free): hashes, atomic writes, versioned JSON documents."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from efficientad.errors import UserError


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(temporary_path)` in the same folder, then rename onto `path`: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def check_versioned_document(
    document: Any,
    path: Path,
    *,
    expected_format: str,
    max_version: int,
    error: type[UserError],
    what: str,
) -> dict[str, Any]:
    """`document` itself when it is a dict whose "format" is `expected_format` and "format_version" an int
    <= `max_version`; otherwise `error` with a message naming `path` and `what` it should have been."""
    if not isinstance(document, dict) or document.get("format") != expected_format:
        raise error(f"not {what} (format is not {expected_format!r}): {path}")
    version = document.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise error(
            f"{what} format version {version!r} is not supported (this build reads <= {max_version}): {path}"
        )
    return document


def read_versioned_json(
    path: Path, *, expected_format: str, max_version: int, error: type[UserError], what: str
) -> dict[str, Any]:
    """The JSON object in `path`, checked by `check_versioned_document`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{what} is not valid JSON: {path} ({problem})") from None
    return check_versioned_document(
        document, path, expected_format=expected_format, max_version=max_version, error=error, what=what
    )
