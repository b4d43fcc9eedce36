"""Compatibility alias: the model-dir contract lives in `efficientad.model_dir` (torch-free core).

Kept so that `from export.model_dir import ...` in outside code keeps working; new code, and the server
in particular, imports `efficientad.model_dir` directly.
"""

from __future__ import annotations

from efficientad.files import file_sha256
from efficientad.model_dir import *  # noqa: F403 (the alias re-exports the core's public names)
from efficientad.model_dir import __all__ as _CORE_NAMES

__all__ = [*_CORE_NAMES, "file_sha256"]
