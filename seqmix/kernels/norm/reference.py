"""PyTorch reference of the fused residual add + RMSNorm."""

from __future__ import annotations

import torch

from seqmix.kernels.sequences import reference_dtype


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """``h = x + residual`` (rounded to x's dtype), ``normed = h / rms(h) * weight``; returns (normed, h).

    The norm is taken of the rounded sum, so ``normed`` is exactly the RMSNorm of the ``h`` the
    caller carries on; the sum and the norm are computed in float32 (float64 for float64).
    """
    dtype = reference_dtype(x)
    h = x if residual is None else (x.to(dtype) + residual.to(dtype)).to(x.dtype)
    h32 = h.to(dtype)
    normed = h32 * torch.rsqrt(h32.square().mean(-1, keepdim=True) + eps) * weight.to(dtype)
    return normed.to(x.dtype), h
