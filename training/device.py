"""The torch device (`--device auto|cpu|cuda`) and the compute precision (`--precision auto|fp32|bf16`).

bfloat16 autocast pays only where the hardware computes in bfloat16: CUDA GPUs, and CPUs with AVX512-BF16
or AMX. Elsewhere oneDNN emulates it and a PDN step gets slower, not faster (measured on a 2-core AMD EPYC
without AVX-512: 1.6 s fp32 -> 62 s bf16), so `auto` picks fp32 there. Losses, statistics and quantiles
are always computed in fp32; only the networks' forward passes run under autocast.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from efficientad.errors import UserError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of native bf16 compute


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is available to torch")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo, e.g. macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    return bool(cpu_flags(cpuinfo) & CPU_BF16_FLAGS)


def resolve_precision(name: str, device: torch.device) -> str:
    """ "fp32" or "bf16" for `--precision name` on `device`; `auto` picks bf16 only where it is native."""
    if name not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name != "auto":
        if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            logger.warning("bf16 on a CPU without AVX512-BF16/AMX: it will be much slower than fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bfloat16 autocast for `precision == "bf16"`, a no-op for fp32."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield
