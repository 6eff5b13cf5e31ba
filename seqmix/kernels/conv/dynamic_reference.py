"""LightConv and DynamicConv in plain PyTorch (K multiply-adds of shifted views), and the DropConnect
mask both the reference and the fused kernels compute.

DropConnect draws no random tensor: weight element ``i`` (its flat index in the weight
tensor, ``[H, K]`` or ``[B, T, H, K]``) is kept when a counter-based hash of ``(seed, i)``
clears a threshold. Every backend evaluates the same integer hash, so the fused kernel
(which computes the mask in registers) and the reference drop the same taps, and a run is
reproduced from its seed alone, with no mask tensor stored for the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from seqmix.kernels.library import autocast_off, forward_outputs

# The hash works in 32 bits held in int64: every multiplier is below 2^31, so a product of a
# 32-bit value and a multiplier stays below 2^63 and torch and Triton agree bit for bit.
HASH_MASK = 0xFFFFFFFF
HASH_MUL1 = 0x7FEB352D
HASH_MUL2 = 0x2C1B3C6D
HASH_SEED_MUL = 0x5BD1E995
# A tap is kept when the top 24 bits of its hash are at least ``threshold``.
KEEP_BITS = 24


def dropconnect_threshold(p: float) -> int:
    """The integer threshold of drop probability ``p`` on the 24-bit hash scale."""
    return round(p * (1 << KEEP_BITS))


def _mix32(h):
    h = h ^ (h >> 16)
    h = (h * HASH_MUL1) & HASH_MASK
    h = h ^ (h >> 15)
    h = (h * HASH_MUL2) & HASH_MASK
    return h ^ (h >> 16)


def dropconnect_keep(seed: int, index: torch.Tensor, threshold: int) -> torch.Tensor:
    """Whether weight element ``index`` (int64 flat indices) is kept under ``seed``."""
    seed_lo = (seed * HASH_SEED_MUL) & HASH_MASK
    h = _mix32((index & HASH_MASK) ^ seed_lo)
    h = _mix32(h ^ (index >> 32) ^ seed_lo)
    return (h >> (32 - KEEP_BITS)) >= threshold


def softmax_taps(weight):
    """softmax over the last dim (the K taps) in four element-wise passes. torch.softmax over a dim this short
    (15 by default) takes its scalar path: 2.6 ms for DynamicConv's [16, 128, 4, 15] weights against 0.8 ms
    here, 4.1 against 1.4-1.7 with the backward (one core). The max only shifts the exponent (no gradient)."""
    e = torch.exp(weight - weight.detach().amax(-1, keepdim=True))
    return e * e.sum(-1, keepdim=True).reciprocal()


def effective_weight(weight, weight_softmax: bool, dropconnect: float, seed: int | None):
    """softmax over the K taps (if asked), then DropConnect with the seeded mask, scaled by 1/(1-p)."""
    w = softmax_taps(weight) if weight_softmax else weight
    threshold = dropconnect_threshold(dropconnect)
    if threshold > 0:  # a p that rounds to 0 on the hash's 24-bit scale drops nothing, as in the kernels
        index = torch.arange(weight.numel(), device=weight.device).view(weight.shape)
        keep = dropconnect_keep(seed, index, threshold)
        w = torch.where(keep, w / (1 - dropconnect), torch.zeros_like(w))
    return w


def padding_left(padding: str, K: int) -> int:
    """Taps before the current token: K-1 for "causal", K//2 for "same"."""
    return K - 1 if padding == "causal" else K // 2


class _Taps(torch.autograd.Function):
    """out[b, t, h, r] = sum_j w[.., h, j] xp[b, t + j, h, r] for the padded input xp [B, T + K - 1, H, R] and
    w [H, K] (LightConv) or [B, T, H, K] (DynamicConv): K multiply-adds of shifted views, each a pass over
    [B, T, H, R]. Backward by hand, the same way: dxp[t + j] += dout[t] w[j] into one buffer, dw[j] = sum_r
    dout xp[t + j]. (The einsum over unfolded windows ran as B T H matrix-vector products, its backward as
    many outer products, plus the unfold's: 30 ms a layer's fwd+bwd at the tiny LM's sizes; autograd over
    the shifted views would add a zero tensor of xp's size per tap: docs/design.md, "Thirteenth round".)"""

    @staticmethod
    def forward(ctx, xp, w):
        T = xp.shape[1] - w.shape[-1] + 1
        out = xp[:, :T] * w[..., 0, None]
        for j in range(1, w.shape[-1]):
            out.addcmul_(xp[:, j:j + T], w[..., j, None])
        ctx.save_for_backward(xp, w)
        return forward_outputs(out)

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, dout):
        xp, w = ctx.saved_tensors
        K = w.shape[-1]
        T = xp.shape[1] - K + 1
        dxp = dw = None
        if ctx.needs_input_grad[0]:
            dxp = torch.zeros_like(xp)
            for j in range(K):
                dxp[:, j:j + T].addcmul_(dout, w[..., j, None])
        if ctx.needs_input_grad[1]:
            over = (0, 1, 3) if w.dim() == 2 else (3,)  # LightConv's w is shared by every b and t
            dw = torch.stack([torch.mul(dout, xp[:, j:j + T]).sum(over) for j in range(K)], -1)
        return dxp, dw


def _conv_dense(x, w, P):
    """x [B, T, C]; w [H, K] or [B, T, H, K]. out[t] = sum_j w[t, :, j] x[t + j - P] (zeros off the sequence)."""
    B, T, C = x.shape
    H, K = w.shape[-2:]
    xp = F.pad(x, (0, 0, P, K - 1 - P)).view(B, T + K - 1, H, C // H)  # tap j of token t reads xp[t + j]
    return _Taps.apply(xp, w).reshape(B, T, C)


@autocast_off
def dynamic_conv_reference(x, weight, padding="causal", weight_softmax=True, dropconnect=0.0, seed=None,
                           cu_seqlens=None):
    """Same arguments and result as :func:`seqmix.kernels.dynamic_conv` (and :func:`light_conv` for a
    weight of shape [H, K]), computed in float32 or float64 and returned in x's dtype."""
    K = weight.shape[-1]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = effective_weight(weight.to(dt), weight_softmax, dropconnect, seed)
    x32 = x.to(dt)
    P = padding_left(padding, K)
    if cu_seqlens is None:
        return _conv_dense(x32, w, P).to(x.dtype)
    outs = []
    for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        outs.append(_conv_dense(x32[:, s:e], w if w.dim() == 2 else w[:, s:e], P))
    return torch.cat(outs, 1).to(x.dtype)
