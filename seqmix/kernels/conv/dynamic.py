"""LightConv and DynamicConv (Wu et al. 2019): depthwise convolutions whose K taps are shared by
the R = C/H channels of a head, softmax-normalised, and either learned (LightConv) or predicted
per token (DynamicConv)."""

from __future__ import annotations

import torch
from torch import Tensor

from seqmix.kernels import triton_limits
from seqmix.kernels.backend import LazyModule, select_backend
from seqmix.kernels.checks import check_cu_seqlens, check_tensor
from seqmix.kernels.conv import cuda as cuda_ops
from seqmix.kernels.conv.dynamic_reference import (
    HASH_MASK,
    HASH_SEED_MUL,
    dropconnect_threshold,
    dynamic_conv_reference,
    padding_left,
)
from seqmix.kernels.library import custom_op
from seqmix.kernels.op import as_input_grads, chunking_args, chunking_of, nothing, register_autograd
from seqmix.kernels.sequences import chunking_for, packed_bounds
from seqmix.kernels.triton_limits import DYNAMIC_CONV_CHUNK

PADDINGS = ("causal", "same")

kernels = LazyModule("seqmix.kernels.conv.dynamic_triton")


# The Triton kernels as torch.library ops (the protocol of seqmix/kernels/op.py, with no state):
# x [L, C] packed, weight [L, H, K] (dynamic_conv) or [H, K] (light_conv); DropConnect as
# (seed_lo, threshold, scale), threshold 0 when off.

@custom_op("seqmix::dynamic_conv_chunk_fwd", mutates_args=())
def _chunk_fwd(x: Tensor, weight: Tensor, cu_seqlens: Tensor, chunk_index: Tensor, chunk_offsets: Tensor,
               heads: int, pad_left: int, softmax: bool, seed_lo: int, threshold: int, scale: float
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out [L, C], no state, and for the backward the softmax's log-sum-exp [L, H] float32)."""
    chunking = chunking_of(cu_seqlens, chunk_index, chunk_offsets, DYNAMIC_CONV_CHUNK)
    out, lse = kernels.dynamic_conv_fwd(x, weight, chunking, heads, pad_left, softmax, (seed_lo, threshold, scale))
    return out, nothing(x), nothing(x) if lse is None else lse


@_chunk_fwd.register_fake
def _(x, weight, cu_seqlens, chunk_index, chunk_offsets, heads, pad_left, softmax, seed_lo, threshold, scale):
    lse = x.new_empty((x.shape[0], heads), dtype=torch.float32) if softmax else nothing(x)
    return torch.empty_like(x), nothing(x), lse


@custom_op("seqmix::dynamic_conv_chunk_bwd", mutates_args=())
def _chunk_bwd(x: Tensor, weight: Tensor, cu_seqlens: Tensor, chunk_index: Tensor, chunk_offsets: Tensor,
               lse: Tensor, heads: int, pad_left: int, softmax: bool, seed_lo: int, threshold: int, scale: float,
               dout: Tensor, dfinal: Tensor | None, needs: list[bool]) -> list[Tensor]:
    chunking = chunking_of(cu_seqlens, chunk_index, chunk_offsets, DYNAMIC_CONV_CHUNK)
    dx, dw = kernels.dynamic_conv_bwd(x, weight, lse if softmax else None, dout, chunking, heads, pad_left, softmax,
                                      (seed_lo, threshold, scale))
    return as_input_grads((dx, dw, None, None, None), (x, weight, cu_seqlens, chunk_index, chunk_offsets), needs, x)


register_autograd(_chunk_fwd, _chunk_bwd, num_inputs=5)


def _check(x, weight, per_token: bool, padding, dropconnect, seed, cu_seqlens):
    """Validate a call; returns the number of heads H."""
    check_tensor("x", x, (None, None, None), dims="[B, T, C]")
    B, T, C = x.shape
    if per_token:
        check_tensor("weight", weight, (B, T, None, None), dims="[B, T, H, K]", like=x)
    else:
        check_tensor("weight", weight, (None, None), dims="[H, K]", like=x)
    H, K = weight.shape[-2:]
    if H < 1 or K < 1:
        raise ValueError(f"weight must have H >= 1 heads and K >= 1 taps, got shape {tuple(weight.shape)}")
    if C % H:
        raise ValueError(f"x's channels C={C} must be divisible by weight's heads H={H} (C = H*R)")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if padding == "same" and K % 2 == 0:
        raise ValueError(f"padding='same' needs an odd kernel size K, got weight with K={K}")
    if not 0.0 <= dropconnect < 1.0:
        raise ValueError(f"dropconnect must be in [0, 1), got {dropconnect}")
    if seed is not None and not isinstance(seed, int):
        raise ValueError(f"seed must be an int or None, got {type(seed).__name__}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, batch=B, total=T, like=x)
    return H


def _dispatch(op, x, weight, padding, weight_softmax, dropconnect, seed, cu_seqlens, backend):
    per_token = op == "dynamic_conv"
    heads = _check(x, weight, per_token, padding, dropconnect, seed, cu_seqlens)
    if dropconnect > 0 and seed is None:
        # Drawn from torch's default generator, so torch.manual_seed reproduces the mask.
        seed = int(torch.randint(0, 2**62, (1,)).item())
    B, T, C = x.shape
    K = weight.shape[-1]
    name = select_backend(op, backend, x.device, ("triton", "cuda", "reference"),
                          {"triton": triton_limits.unsupported("x", x.dtype),
                           "cuda": cuda_ops.dynamic_conv_unsupported(x.dtype, K)})
    if name == "reference" or T == 0:
        return dynamic_conv_reference(x, weight, padding, weight_softmax, dropconnect, seed, cu_seqlens)
    seed_lo = 0 if seed is None else (seed * HASH_SEED_MUL) & HASH_MASK
    drop = (seed_lo, dropconnect_threshold(dropconnect), 1.0 / (1.0 - dropconnect))
    x2 = x.reshape(B * T, C).contiguous()
    w = (weight.reshape(B * T, heads, K) if per_token else weight).contiguous()
    if name == "cuda":
        out, _ = cuda_ops.dynamic_conv_fwd(x2, w.to(x.dtype), packed_bounds(B, T, x.device, cu_seqlens), heads,
                                           padding_left(padding, K), weight_softmax, *drop)
    else:
        chunking = chunking_for(B, T, DYNAMIC_CONV_CHUNK, x.device, cu_seqlens)
        out, _, _ = _chunk_fwd(x2, w, *chunking_args(chunking), heads, padding_left(padding, K), weight_softmax,
                               *drop)
    return out.view(B, T, C)


_ARGS_DOC = """
        padding: ``"causal"`` (P = K-1: the last tap is the current token) or ``"same"`` (P = K//2, K odd).
        weight_softmax: normalise each kernel's K taps with a softmax (the weights are logits).
        dropconnect: probability of dropping a (normalised) tap; kept taps are scaled by 1/(1-p).
            The mask is a hash of (seed, the tap's flat index in ``weight``), so every backend
            drops the same taps for the same seed.
        seed: the DropConnect seed; None draws one from torch's default generator.
        cu_seqlens: [N+1] boundaries of sequences packed as ``[1, sum(T_i), C]``; taps never
            cross a boundary.
        backend: None (automatic), ``"reference"``, ``"triton"`` or ``"cuda"`` (the compiled extension:
            named, or through ``SEQMIX_BACKEND``; the automatic choice prefers Triton).
"""


def light_conv(x, weight, *, padding="causal", weight_softmax=True, dropconnect=0.0, seed=None, cu_seqlens=None,
               backend=None) -> torch.Tensor:
    """Lightweight convolution: ``out[t, c] = sum_j w[h(c), j] * x[t + j - P, c]`` with
    ``w = dropconnect(softmax(weight))``, h(c) = c // R; taps outside the sequence read zero
    and the softmax is over all K taps (also when T < K).

    Args:
        x: [B, T, C] inputs, C = H*R.
        weight: [H, K] one kernel per head.{args}
    Returns:
        out: [B, T, C] in x's dtype.
    """
    return _dispatch("light_conv", x, weight, padding, weight_softmax, dropconnect, seed, cu_seqlens, backend)


def dynamic_conv(x, weight, *, padding="causal", weight_softmax=True, dropconnect=0.0, seed=None, cu_seqlens=None,
                 backend=None) -> torch.Tensor:
    """Dynamic convolution: ``out[t, c] = sum_j w[t, h(c), j] * x[t + j - P, c]`` with one kernel per
    token and head, ``w = dropconnect(softmax(weight))``; taps outside the sequence read zero and the
    softmax is over all K taps (also when T < K).

    Args:
        x: [B, T, C] inputs, C = H*R.
        weight: [B, T, H, K] one kernel per token and head (logits when ``weight_softmax``).{args}
    Returns:
        out: [B, T, C] in x's dtype.
    """
    return _dispatch("dynamic_conv", x, weight, padding, weight_softmax, dropconnect, seed, cu_seqlens, backend)


for _op in (light_conv, dynamic_conv):
    _op.__doc__ = _op.__doc__.format(args=_ARGS_DOC)
