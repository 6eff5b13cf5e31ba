"""PyTorch reference of the fused residual add + RMSNorm."""

from __future__ import annotations

import torch

from seqmix.kernels.sequences import reference_dtype


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """``h = x + residual`` (rounded to x's dtype), ``normed = h / rms(h) * weight``; returns (normed, h).

    The norm is taken of the rounded sum, so ``normed`` is exactly the RMSNorm of the ``h`` the
    caller carries on; the norm is computed in float32 (float64 for float64). PyTorch adds half
    precision tensors in float32 and rounds once, so ``x + residual`` is that rounded sum.
    """
    h = x if residual is None else x + residual
    h32 = h.to(reference_dtype(x))
    normed = h32 * torch.rsqrt(h32.square().mean(-1, keepdim=True) + eps) * weight.to(h32.dtype)
    return normed.to(x.dtype), h
