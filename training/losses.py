"""EfficientAD's training losses (paper Algorithm 1) and a quantile without torch.quantile's size limit.

The student's 768 output channels: the first 384 (S_st) predict the normalised teacher, the last 384
(S_ae) predict the autoencoder.
"""

from __future__ import annotations

import math

import torch

HARD_QUANTILE = 0.999


def quantile(values: torch.Tensor, q: float, *, method: str = "auto") -> torch.Tensor:
    """The q-quantile of all elements with linear interpolation (as torch.quantile), for any size.

    torch.quantile refuses inputs above 16M elements. `method`: "select" (kthvalue, linear time; the CPU
    default), "sort" (a radix sort; the GPU default, where kthvalue runs one long row in a single thread
    block and is far slower) or "auto".
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    if method not in ("auto", "select", "sort"):
        raise ValueError(f"quantile method must be auto, select or sort, got {method!r}")
    flat = values.detach().flatten()
    if flat.numel() == 0:
        raise ValueError("quantile of an empty tensor")
    position = q * (flat.numel() - 1)
    lower_index = math.floor(position)
    upper_index = min(lower_index + 1, flat.numel() - 1)
    fraction = position - lower_index
    if method == "select" or (method == "auto" and flat.device.type == "cpu"):
        lower = flat.kthvalue(lower_index + 1).values  # kthvalue is 1-based
        upper = flat.kthvalue(upper_index + 1).values if fraction > 0.0 else lower
    else:
        ordered = torch.sort(flat).values
        lower, upper = ordered[lower_index], ordered[upper_index]
    return lower + fraction * (upper - lower)


def hard_feature_loss(teacher_features: torch.Tensor, student_st: torch.Tensor) -> torch.Tensor:
    """Mean of the squared differences at or above their 0.999 quantile.

    `teacher_features`: (N, 384, h, w) normalised teacher output; `student_st`: (N, 384, h, w).
    """
    distance = (teacher_features - student_st) ** 2  # (N, 384, h, w)
    hard = (distance >= quantile(distance, HARD_QUANTILE)).to(distance.dtype)  # 1 where kept
    return (distance * hard).sum() / hard.sum()  # a masked mean: no boolean indexing, no GPU sync


def penalty_loss(student_st_on_penalty: torch.Tensor) -> torch.Tensor:
    """mean(S_st(P)^2): keeps the student from imitating the teacher outside the normal images."""
    return (student_st_on_penalty**2).mean()


def autoencoder_loss(teacher_features: torch.Tensor, autoencoder_output: torch.Tensor) -> torch.Tensor:
    """L_AE = mean((T_norm(aug) - AE(aug))^2)."""
    return ((teacher_features - autoencoder_output) ** 2).mean()


def student_autoencoder_loss(autoencoder_output: torch.Tensor, student_ae: torch.Tensor) -> torch.Tensor:
    """L_STAE = mean((AE(aug) - S_ae(aug))^2); gradients reach both networks, as in the paper."""
    return ((autoencoder_output - student_ae) ** 2).mean()
