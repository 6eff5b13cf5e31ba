"""PyTorch references of the norms: RMSNorm (gated or not) with a hand-written backward, and the fused residual
add + RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from seqmix.kernels.library import forward_outputs
from seqmix.kernels.sequences import in_dtype, reference_dtype


def _rms_norm(x, weight, gate, eps):
    """(x * r * weight [* silu(gate)], r) with r = rsqrt(mean(x^2) + eps) [..., 1]."""
    r = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
    y = torch.mul(x, r).mul_(weight)
    if gate is not None:
        y.mul_(F.silu(gate))
    return y, r


class RMSNormFunction(torch.autograd.Function):
    """y = xhat * w [* silu(gate)], xhat = x * r, r = rsqrt(mean(x^2) + eps) over the last dim. The backward
    recomputes xhat and silu(gate) from the inputs and r (nothing of size [..., D] saved besides the inputs):
    with t = dy * g * xhat, dw = sum_rows t, dx = r * (dy g w - xhat * mean(t w)), dgate = silu'(gate) dy xhat w;
    mean(t w) is a matrix-vector product. Every pass is over contiguous rows."""

    @staticmethod
    def forward(ctx, x, weight, gate, eps):
        y, r = _rms_norm(x, weight, gate, eps)
        ctx.save_for_backward(x, weight, gate, r)
        return forward_outputs(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, gate, r = ctx.saved_tensors
        D = x.shape[-1]
        xhat = x * r
        t = dy * xhat
        dgate = None
        if gate is not None:
            if ctx.needs_input_grad[2]:
                dgate = t * weight
                dgate = torch.ops.aten.silu_backward.grad_input(dgate, gate, grad_input=dgate)
            g = F.silu(gate)
            t.mul_(g)
            dyg = g.mul_(dy)
        else:
            dyg = dy
        dweight = t.reshape(-1, D).sum(0) if ctx.needs_input_grad[1] else None
        mean_tw = (t @ weight).unsqueeze_(-1).div_(D)
        dx = xhat.mul_(mean_tw.neg_()).addcmul_(dyg, weight).mul_(r)
        return dx, dweight, dgate, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm [* silu(gate)] in tensor ops, computed in float32 (float64 for float64 x), returned in x's dtype;
    with autograd through :class:`RMSNormFunction`, without it the forward alone (a Function's call costs
    more than its few ops)."""
    dt = reference_dtype(x)
    args = (in_dtype(x, dt), in_dtype(weight, dt), None if gate is None else in_dtype(gate, dt), eps)
    y = RMSNormFunction.apply(*args) if torch.is_grad_enabled() else _rms_norm(*args)[0]
    return in_dtype(y, x.dtype)


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
