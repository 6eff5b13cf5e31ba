"""Normalisation: the fused residual add + RMSNorm (``add_rms_norm``) of the sandwich norms and pre-norm blocks."""

from __future__ import annotations

import math

import torch

from seqmix.kernels.backend import select_backend
from seqmix.kernels.checks import check_same_dtype, check_tensor
from seqmix.kernels.norm import triton as kernels
from seqmix.kernels.norm.reference import add_rms_norm_reference

__all__ = ["add_rms_norm", "add_rms_norm_backend", "add_rms_norm_reference"]


class _AddRMSNorm(torch.autograd.Function):
    """Rows [M, D]; with a residual the outputs are (normed, new_residual), without it normed alone."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        normed, new_residual, rstd = kernels.add_rms_norm_fwd(x, residual, weight, eps)
        ctx.save_for_backward(x if new_residual is None else new_residual, weight, rstd)
        ctx.has_residual = residual is not None
        # An output nobody uses gets None, not a zero tensor the kernel would read.
        ctx.set_materialize_grads(False)
        return normed if new_residual is None else (normed, new_residual)

    @staticmethod
    def backward(ctx, dnormed, dnew_residual=None):
        h, weight, rstd = ctx.saved_tensors
        dnormed = None if dnormed is None else dnormed.contiguous()
        dnew_residual = None if dnew_residual is None else dnew_residual.contiguous()
        dh, dweight = kernels.add_rms_norm_bwd(h, weight, rstd, dnormed, dnew_residual)
        dresidual = dh if ctx.has_residual and ctx.needs_input_grad[1] else None
        return dh, dresidual, dweight.to(weight.dtype), None


def _check(x, residual, weight, eps):
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape [..., D] with D >= 1, got {got}")
    check_tensor("x", x, (None,) * x.dim(), dims="[..., D]")
    D = x.shape[-1]
    if residual is not None:
        check_tensor("residual", residual, tuple(x.shape), dims="[..., D] (x's shape)", like=x)
        check_same_dtype(("x", "residual"), (x, residual))
    check_tensor("weight", weight, (D,), dims="[D]", like=x)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


def add_rms_norm_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The backend :func:`add_rms_norm` takes for tensors like x (``backend`` as the op's argument): a layer
    that calls the op many times per forward resolves it once and names it."""
    return select_backend("add_rms_norm", backend, x.device, ("triton", "reference"),
                          {"triton": kernels.unsupported(x.dtype)})


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and RMSNorm in one pass: ``h = x + residual``, ``normed = h / sqrt(mean(h^2) + eps) * weight``.

    The sum is rounded to x's dtype before it is normalised, so ``normed`` is exactly the RMSNorm
    of the returned ``h`` (the stream a pre-norm block carries on); sum and norm are computed in
    float32. Gradients flow into x, residual and weight from both outputs.

    Args:
        x: [..., D], e.g. a sublayer's output [B, T, D].
        residual: [..., D] like x (same dtype), or None (then ``h`` is x itself: a plain RMSNorm).
        weight: [D] (any float dtype).
        eps: added to the mean square.
        backend: None (automatic), ``"reference"`` or ``"triton"``.

    Returns:
        normed: [..., D] in x's dtype.
        new_residual: [..., D] ``h``, in x's dtype.
    """
    _check(x, residual, weight, eps)
    name = add_rms_norm_backend(x, backend)
    if name == "reference" or x.numel() == 0:
        return add_rms_norm_reference(x, residual, weight, eps)
    D = x.shape[-1]
    x2d = x.reshape(-1, D).contiguous()
    if residual is None:
        return _AddRMSNorm.apply(x2d, None, weight.contiguous(), float(eps)).view(x.shape), x
    normed, h = _AddRMSNorm.apply(x2d, residual.reshape(-1, D).contiguous(), weight.contiguous(), float(eps))
    return normed.view(x.shape), h.view(x.shape)
