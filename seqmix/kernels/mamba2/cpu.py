"""The C++ CPU SSD (ssd_cpu.cpp, built by seqmix/kernels/cpu.py) as torch.library ops, in the protocol of
seqmix/kernels/op.py.

Inputs arrive packed like the Triton kernels' (x, z ``[L, H, P]``, dt ``[L, H]``, B, C ``[L, G, N]``, A, D,
dt_bias ``[H]``), but everything, the initial state included, in the compute dtype (float32 or float64): the
kernel computes in that dtype and returns the final state and every gradient in it.

A second pair of ops (``ssd_cpu_xbc_*``, for :func:`seqmix.kernels.mamba2.ssd_xbc`) takes x, B and C as the
column blocks of one tensor ``xbc [L, H P + 2 G N]`` and returns their gradient as one tensor of that layout:
the kernels read and write those rows in place, so neither the packing copies nor a split's concatenation in
the backward remain (docs/design.md, "Sixth round: a C++ RMSNorm; SSD on the conv's output in place; GLA's
and Mamba's decoding steps"). With ``in_proj`` the tensor is Mamba-2's whole in_proj output ``[L, 2 H P + 2 G N +
H]``, z and dt its first and last column blocks, and its gradient one tensor of that layout too (for
:func:`seqmix.kernels.mamba2.ssd_zxbcdt`; docs/design.md, "Thirtieth round").
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from seqmix.kernels import cpu
from seqmix.kernels.library import custom_op
from seqmix.kernels.op import FusedOp, as_input_grads, fake_outputs, nothing, register_autograd

# Tokens per chunk: the chunk's products are [64, N] x [N, (H / G) P] matrix products, as fast per FLOP as
# larger ones at the LM's sizes, and its [64, 64] masks stay in L1 (docs/design.md).
CHUNK = 64
# Training on a dense batch of CHUNK < T <= WHOLE_CHUNK tokens per sequence takes each sequence as one chunk:
# no state passes between its two chunks, and the products are larger (docs/design.md, "Eleventh round").
WHOLE_CHUNK = 128
DTYPES = (torch.float32, torch.float64)


def unsupported(dtype: torch.dtype) -> str | None:
    """Why the C++ kernels cannot take inputs of ``dtype``; None if they can."""
    if dtype not in DTYPES:
        return f"x, dt, B, C must be float32 or float64, got {dtype}"
    return None


def _fake_outputs(x, B, cu_seqlens, store_final):
    L, H, P = x.shape
    out, final = fake_outputs(x, (L, H, P), (cu_seqlens.shape[0] - 1, H, P, B.shape[-1]), store_final)
    return out, final.to(x.dtype)


def _columns(xbc, dt, z, heads, groups, state, in_proj):
    """(x [L, H, P], dt, B and C [L, G, N], z): x, B and C the views of the column blocks of xbc [L, H P + 2 G N],
    dt and z as given; or with in_proj, xbc = [z, x, B, C, dt] [L, 2 H P + 2 G N + H] and z [L, H, P] and dt
    [L, H] views of its blocks too (the arguments dt and z are then None)."""
    L, GN = xbc.shape[0], groups * state
    HP = (xbc.shape[1] - 2 * GN - heads) // 2 if in_proj else xbc.shape[1] - 2 * GN
    zs, x, B, C, dts = xbc.split([HP if in_proj else 0, HP, GN, GN, heads if in_proj else 0], dim=1)
    if in_proj:
        dt, z = dts, zs.view(L, heads, -1)
    return x.view(L, heads, -1), dt, B.view(L, groups, state), C.view(L, groups, state), z


def _fwd(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_offsets, num_chunks, softplus, lo, hi, store_final,
         store_chunks, conv_weight=None, conv_bias=None, chunk=CHUNK, norm_weight=None, norm_eps=0.0):
    return cpu.extension().ssd_fwd(x, dt, B, C, z, A, D, dt_bias, conv_weight, conv_bias, norm_weight, norm_eps, h0,
                                   cu_seqlens, chunk_offsets, chunk, num_chunks, softplus, lo, hi, store_final,
                                   store_chunks)


@custom_op("seqmix::ssd_cpu_chunk_fwd", mutates_args=())
def _chunk_fwd(x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
               dt_bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor, chunk_index: Tensor,
               chunk_offsets: Tensor, softplus: bool, lo: float, hi: float, store_final: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, final state, and for the backward: the state entering each chunk [NC, H, P, N], the
    entering states' part of y [L, H, P] (both unset for chunks without an entering state, which the backward
    does not read), and with z the ungated y + D x [L, H, P])."""
    return tuple(_fwd(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_offsets, chunk_index.shape[0], softplus,
                      lo, hi, store_final, True))


@_chunk_fwd.register_fake
def _chunk_fwd_fake(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_index, chunk_offsets, softplus, lo, hi,
                    store_final):
    L, H, P = x.shape
    y_pre = nothing(x) if z is None else torch.empty_like(x)
    return (*_fake_outputs(x, B, cu_seqlens, store_final), x.new_empty((chunk_index.shape[0], H, P, B.shape[-1])),
            torch.empty_like(x), y_pre)


@custom_op("seqmix::ssd_cpu_chunk_bwd", mutates_args=())
def _chunk_bwd(x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
               dt_bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor, chunk_index: Tensor,
               chunk_offsets: Tensor, hc: Tensor, y_in: Tensor, y_pre: Tensor, softplus: bool, lo: float, hi: float,
               store_final: bool, dout: Tensor | None, dht: Tensor | None, needs: list[bool]) -> list[Tensor]:
    dx, ddt, dB, dC, dz, dA, dD, ddt_bias, dh0, *_ = _bwd(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens,
                                                          chunk_offsets, hc, y_in, y_pre, softplus, lo, hi, dout,
                                                          dht, needs[8], False)
    grads = (dx, ddt, dB, dC, dz, dA, dD, ddt_bias, dh0, None, None, None)
    inputs = (x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_index, chunk_offsets)
    return as_input_grads(grads, inputs, needs, x)


def _bwd(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_offsets, hc, y_in, y_pre, softplus, lo, hi, dout, dht,
         need_dh0, packed, conv_weight=None, conv_bias=None, chunk=CHUNK, norm_weight=None, norm_eps=0.0,
         in_proj=False):
    """(dx, ddt, dB, dC, dz, dA, dD, ddt_bias, dh0, dconv_weight, dconv_bias, dnorm_weight), None for the absent
    inputs' (and with packed, dB and dC: dx is then xbc's gradient; with in_proj, ddt and dz too: dx is the
    whole in_proj output's)."""
    if dout is None:  # only the final state was used
        dout = x.new_zeros(x.shape)
    grads = cpu.extension().ssd_bwd(x, dt, B, C, z, A, D, dt_bias, conv_weight, conv_bias, norm_weight, norm_eps,
                                    h0 is not None, cu_seqlens, chunk_offsets, hc, y_in, y_pre, chunk, softplus, lo,
                                    hi, dout, dht, h0 is not None and need_dh0, packed, in_proj)
    present = (True, not in_proj, not packed, not packed, z is not None and not in_proj, True, D is not None,
               dt_bias is not None, h0 is not None, conv_weight is not None, conv_bias is not None,
               norm_weight is not None)
    return [g if there else None for g, there in zip(grads, present, strict=True)]


# Gradients not materialized: an unused final state's gradient is None, not a tensor of zeros the kernel reads.
register_autograd(_chunk_fwd, _chunk_bwd, num_inputs=12, materialize_grads=False)


@custom_op("seqmix::ssd_cpu_fwd", mutates_args=())
def _recurrent_fwd(x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor | None, A: Tensor, D: Tensor | None,
                   dt_bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor, chunk_index: Tensor,
                   chunk_offsets: Tensor, softplus: bool, lo: float, hi: float, store_final: bool
                   ) -> tuple[Tensor, Tensor]:
    """The same forward without what a backward would need."""
    out, ht, *_ = _fwd(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_offsets, 0, softplus, lo, hi,
                       store_final, False)
    return out, ht


@_recurrent_fwd.register_fake
def _(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_index, chunk_offsets, softplus, lo, hi, store_final):
    return _fake_outputs(x, B, cu_seqlens, store_final)


# The chunked forward serves every call; one that wants no gradient stores nothing for a backward.
FUSED = FusedOp(CHUNK, _chunk_fwd, _recurrent_fwd, recurrent_max_tokens=None)


@custom_op("seqmix::ssd_cpu_xbc_chunk_fwd", mutates_args=())
def _xbc_chunk_fwd(xbc: Tensor, dt: Tensor | None, z: Tensor | None, A: Tensor, D: Tensor | None,
                   dt_bias: Tensor | None, conv_weight: Tensor | None, conv_bias: Tensor | None,
                   norm_weight: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor, chunk_index: Tensor,
                   chunk_offsets: Tensor, heads: int, groups: int, state: int, softplus: bool, lo: float, hi: float,
                   chunk: int, norm_eps: float, in_proj: bool, store_final: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_chunk_fwd` with x, B and C the column blocks of xbc [L, H P + 2 G N], or with conv_weight [H P +
    2 G N, W] (and conv_bias) those of silu(the causal conv of xbc), computed inside the chunks of ``chunk``
    tokens (the chunking's); with norm_weight [H P] (one group) the gated output RMS-normalised per token. With
    in_proj, xbc is [z, xbc, dt] [L, 2 H P + 2 G N + H] and the arguments dt and z are None."""
    x, dt, B, C, z = _columns(xbc, dt, z, heads, groups, state, in_proj)
    return tuple(_fwd(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_offsets, chunk_index.shape[0], softplus,
                      lo, hi, store_final, True, conv_weight, conv_bias, chunk, norm_weight, norm_eps))


@_xbc_chunk_fwd.register_fake
def _(xbc, dt, z, A, D, dt_bias, conv_weight, conv_bias, norm_weight, h0, cu_seqlens, chunk_index, chunk_offsets,
      heads, groups, state, softplus, lo, hi, chunk, norm_eps, in_proj, store_final):
    x, dt, B, C, z = _columns(xbc, dt, z, heads, groups, state, in_proj)
    *outputs, y_pre = _chunk_fwd_fake(x, dt, B, C, z, A, D, dt_bias, h0, cu_seqlens, chunk_index, chunk_offsets,
                                      softplus, lo, hi, store_final)
    return (*outputs, torch.empty_like(x) if norm_weight is not None else y_pre)


@custom_op("seqmix::ssd_cpu_xbc_chunk_bwd", mutates_args=())
def _xbc_chunk_bwd(xbc: Tensor, dt: Tensor | None, z: Tensor | None, A: Tensor, D: Tensor | None,
                   dt_bias: Tensor | None, conv_weight: Tensor | None, conv_bias: Tensor | None,
                   norm_weight: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor, chunk_index: Tensor,
                   chunk_offsets: Tensor, hc: Tensor, y_in: Tensor, y_pre: Tensor, heads: int, groups: int, state: int,
                   softplus: bool, lo: float, hi: float, chunk: int, norm_eps: float, in_proj: bool,
                   store_final: bool, dout: Tensor | None, dht: Tensor | None, needs: list[bool]) -> list[Tensor]:
    x, dt_cols, B, C, z_cols = _columns(xbc, dt, z, heads, groups, state, in_proj)
    dxbc, ddt, _, _, dz, dA, dD, ddt_bias, dh0, dweight, dbias, dnorm = _bwd(
        x, dt_cols, B, C, z_cols, A, D, dt_bias, h0, cu_seqlens, chunk_offsets, hc, y_in, y_pre, softplus, lo, hi,
        dout, dht, needs[9], True, conv_weight, conv_bias, chunk, norm_weight, norm_eps, in_proj)
    grads = (dxbc, ddt, dz, dA, dD, ddt_bias, dweight, dbias, dnorm, dh0, None, None, None)
    inputs = (xbc, dt, z, A, D, dt_bias, conv_weight, conv_bias, norm_weight, h0, cu_seqlens, chunk_index,
              chunk_offsets)
    return as_input_grads(grads, inputs, needs, xbc)


register_autograd(_xbc_chunk_fwd, _xbc_chunk_bwd, num_inputs=13, materialize_grads=False)
# Training only (ssd_xbc takes the split tensors without autograd, where nothing is stored for a backward).
XBC_FUSED = FusedOp(CHUNK, _xbc_chunk_fwd)


def xbc_fused(seqlen: int, cu_seqlens: Tensor | None) -> FusedOp:
    """XBC_FUSED, or the same ops in chunks of WHOLE_CHUNK tokens for a dense batch of seqlen tokens per sequence,
    CHUNK < seqlen <= WHOLE_CHUNK. (Packed sequences keep CHUNK: their lengths are data.)"""
    if cu_seqlens is None and CHUNK < seqlen <= WHOLE_CHUNK:
        return dataclasses.replace(XBC_FUSED, chunk_size=WHOLE_CHUNK)
    return XBC_FUSED
