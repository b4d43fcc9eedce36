"""Compatibility alias: the model-dir contract lives in `efficientad.model_dir` (torch-free core).

Kept so that `from export.model_dir import ...` in outside code keeps working; new code, and the server
in particular, imports `efficientad.model_dir` directly.
"""

from __future__ import annotations

from efficientad.files import file_sha256
from efficientad.model_dir import (
    ENGINE_SUFFIX,
    ENGINES_DIR,
    INPUT_NAME,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    MODEL_JSON_FILE,
    ONNX_FILE,
    OUTPUT_NAMES,
    VERSION_HEX_DIGITS,
    ModelDirError,
    ModelInfo,
    engine_filename,
    find_engine,
    parse_engine_filename,
    read_model_dir,
)

__all__ = [
    "ENGINES_DIR",
    "ENGINE_SUFFIX",
    "INPUT_NAME",
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "MODEL_JSON_FILE",
    "ONNX_FILE",
    "OUTPUT_NAMES",
    "VERSION_HEX_DIGITS",
    "ModelDirError",
    "ModelInfo",
    "engine_filename",
    "file_sha256",
    "find_engine",
    "parse_engine_filename",
    "read_model_dir",
]
