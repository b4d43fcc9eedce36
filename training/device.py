"""Picking the torch device from a `--device auto|cpu|cuda` flag."""

from __future__ import annotations

import torch

from efficientad.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is available to torch")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)
