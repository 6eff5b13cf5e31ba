"""Fused Triton kernels of LightConv and DynamicConv, forward and backward (docs/math/conv.md).

Inputs arrive packed: x ``[L, C]`` with C = H*R (head h owns channels h*R .. h*R+R-1) and
sequence boundaries in a :class:`~seqmix.kernels.sequences.Chunking`. The weights are
``[L, H, K]`` (DynamicConv: one kernel per token) or ``[H, K]`` (LightConv), addressed with a
row stride of H*K or 0, so one kernel serves both. One program handles a chunk of ``BT``
tokens of one head and walks the head's channels in blocks of ``BR``.

Tap j of token t reads ``x[t + j - P]``; taps outside the sequence read zero. The softmax over
the K taps and the DropConnect mask (the hash of :mod:`.dynamic_reference`) are applied as
each tap's weight is loaded; the forward keeps the softmax's log-normaliser per (token, head)
for the backward. The backward computes, per chunk, the input gradient (each input gathers
the outputs its taps feed) and the weights' gradient through DropConnect and the softmax:
per token for DynamicConv, per chunk partial sums for LightConv (summed after).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmix.kernels.alloc import empty
from seqmix.kernels.conv.dynamic_reference import HASH_MASK, HASH_MUL1, HASH_MUL2, KEEP_BITS
from seqmix.kernels.sequences import Chunking
from seqmix.kernels.triton_common import autotune, autotune_configs, chunk_position, sequence_bounds
from seqmix.kernels.triton_limits import DYNAMIC_CONV_CHUNK as CHUNK

_MASK = tl.constexpr(HASH_MASK)
_MUL1 = tl.constexpr(HASH_MUL1)
_MUL2 = tl.constexpr(HASH_MUL2)
_DROP_SHIFT = tl.constexpr(32 - KEEP_BITS)


def _configs():
    # First (the interpreter's and the tests' config): 32 rows by 64 channels over 8 warps; with 4 warps
    # the backward at K=31 spilled on sm_90 (tests/kernels/conv/test_sm90_compile.py).
    return autotune_configs([triton.Config({"BR": br}, num_warps=w) for br, w in ((64, 8), (32, 4), (128, 8))])


@triton.jit
def _mix32(h):
    h = h ^ (h >> 16)
    h = (h * _MUL1) & _MASK
    h = h ^ (h >> 15)
    h = (h * _MUL2) & _MASK
    return h ^ (h >> 16)


@triton.jit
def dropconnect_keep(seed_lo, index, threshold):
    """Whether the weight elements at flat int64 ``index`` are kept (the reference's hash)."""
    h = _mix32((index & _MASK) ^ seed_lo)
    h = _mix32(h ^ (index >> 32) ^ seed_lo)
    return (h >> _DROP_SHIFT) >= threshold


@triton.jit
def _row_lse(weight, w_base, o_t, row_ok, K: tl.constexpr, ROW: tl.constexpr, BK: tl.constexpr):
    """log sum_j exp(logit[t, j]) over the K taps of each row of the chunk, [BT] float32."""
    o_k = tl.arange(0, BK)
    k_ok = o_k < K
    logits = tl.load(weight + w_base + (o_t[:, None] * ROW + o_k[None, :]),
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    logits = tl.where(k_ok[None, :], logits, float("-inf"))
    m = tl.max(logits, 1)
    return m + tl.log(tl.sum(tl.exp(logits - m[:, None]), 1))


@triton.jit
def _tap_weight(weight, w_base, rows, row_ok, lse, j, seed_lo, threshold, scale, K: tl.constexpr,
                ROW: tl.constexpr, SOFTMAX: tl.constexpr, DROP: tl.constexpr):
    """The effective weight of tap j for the chunk rows ``rows`` (relative to the chunk start):
    softmax-normalised with the rows' ``lse``, then DropConnect's keep mask and scale."""
    off = w_base + rows * ROW + j
    w = tl.load(weight + off, mask=row_ok, other=0.0).to(tl.float32)
    if SOFTMAX:
        w = tl.exp(w - lse)
    if DROP:
        w = tl.where(dropconnect_keep(seed_lo, off, threshold), w * scale, 0.0)
    return w


@triton.jit
def _program_chunk(chunk_index, cu_seqlens, H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, ROW: tl.constexpr,
                   BT: tl.constexpr):
    """Where this program works (axis 0: chunks times heads): chunk i_c, head h, the chunk's
    first token t0, its sequence's bounds, the rows o_t (valid where row_ok), the offset of the
    first row's weights and of the first row's channels of head h in x."""
    i = tl.program_id(0)
    i_c, h = i // H, i % H
    i_n, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    o_t = tl.arange(0, BT)
    return i_c, h, t0, bos, eos, o_t, o_t < nt, t0 * ROW + h * K, t0 * (H * R) + h * R


@triton.jit
def _channel_block(r0, o_t, C: tl.constexpr, R: tl.constexpr, BR: tl.constexpr):
    """Channels r0 .. r0+BR-1 of the head: their mask [1, BR] and the [BT, BR] offsets from the chunk's row."""
    o_r = r0 + tl.arange(0, BR)
    return (o_r < R)[None, :], o_t[:, None] * C + o_r[None, :]


@autotune(configs=_configs(), key=["H", "R", "K", "ROW"])
@triton.jit
def dynamic_conv_output_fwd_kernel(
    x, weight, out, lse_out, chunk_index, cu_seqlens, seed_lo, threshold, scale,
    H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, P: tl.constexpr, ROW: tl.constexpr,
    BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, SOFTMAX: tl.constexpr, DROP: tl.constexpr,
):
    """out[t, c] = sum_j w[t, h, j] x[t + j - P, c] for one chunk of tokens of head h."""
    _, h, t0, bos, eos, o_t, row_ok, w_base, head = _program_chunk(chunk_index, cu_seqlens, H, R, K, ROW, BT)
    C: tl.constexpr = H * R
    lse = tl.zeros([BT], dtype=tl.float32)
    if SOFTMAX:
        lse = _row_lse(weight, w_base, o_t, row_ok, K, ROW, BK)
        tl.store(lse_out + (t0 + o_t) * H + h, lse, mask=row_ok)
    pos0 = t0 + o_t
    for r0 in range(0, R, BR):
        m_r, tile = _channel_block(r0, o_t, C, R, BR)
        acc = tl.zeros([BT, BR], dtype=tl.float32)
        for j in range(K):
            w_j = _tap_weight(weight, w_base, o_t, row_ok, lse, j, seed_lo, threshold, scale, K, ROW, SOFTMAX, DROP)
            pos = pos0 + (j - P)
            ok = row_ok & (pos >= bos) & (pos < eos)
            x_j = tl.load(x + head + (j - P) * C + tile, mask=ok[:, None] & m_r, other=0.0)
            acc += w_j[:, None] * x_j.to(tl.float32)
        tl.store(out + head + tile, acc.to(out.dtype.element_ty), mask=row_ok[:, None] & m_r)


@autotune(configs=_configs(), key=["H", "R", "K", "ROW"])
@triton.jit
def dynamic_conv_dxdw_bwd_kernel(
    x, weight, lse, dout, dx, dw, chunk_index, cu_seqlens, seed_lo, threshold, scale,
    H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, P: tl.constexpr, ROW: tl.constexpr,
    BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, SOFTMAX: tl.constexpr, DROP: tl.constexpr,
):
    """For one chunk of tokens of head h: dx[s] = sum_j w[s - j + P, h, j] dout[s - j + P], and
    the weights' gradient dlogit[t, j] through DropConnect and the softmax of
    g[t, j] = sum_c dout[t, c] x[t + j - P, c] (per token when ROW > 0, else the chunk's sum)."""
    i_c, h, t0, bos, eos, o_t, row_ok, w_base, head = _program_chunk(chunk_index, cu_seqlens, H, R, K, ROW, BT)
    C: tl.constexpr = H * R
    o_k = tl.arange(0, BK)
    g = tl.zeros([BT, BK], dtype=tl.float32)
    pos0 = t0 + o_t
    for r0 in range(0, R, BR):
        m_r, tile = _channel_block(r0, o_t, C, R, BR)
        do_t = tl.load(dout + head + tile, mask=row_ok[:, None] & m_r, other=0.0).to(tl.float32)
        b_dx = tl.zeros([BT, BR], dtype=tl.float32)
        for j in range(K):
            # Weight gradient: tap j of token t reads x[t + j - P].
            pos = pos0 + (j - P)
            ok = row_ok & (pos >= bos) & (pos < eos)
            x_j = tl.load(x + head + (j - P) * C + tile, mask=ok[:, None] & m_r, other=0.0).to(tl.float32)
            g += tl.where(o_k[None, :] == j, tl.sum(do_t * x_j, 1)[:, None], 0.0)
            # Input gradient: input s reaches output t = s - (j - P) through tap j.
            t_pos = pos0 - (j - P)
            t_ok = row_ok & (t_pos >= bos) & (t_pos < eos)
            lse_t = tl.zeros([BT], dtype=tl.float32)
            if SOFTMAX:
                lse_t = tl.load(lse + t_pos * H + h, mask=t_ok, other=0.0)
            w_j = _tap_weight(weight, w_base, o_t - (j - P), t_ok, lse_t, j, seed_lo, threshold, scale, K, ROW,
                              SOFTMAX, DROP)
            do_j = tl.load(dout + head - (j - P) * C + tile, mask=t_ok[:, None] & m_r, other=0.0)
            b_dx += w_j[:, None] * do_j.to(tl.float32)
        tl.store(dx + head + tile, b_dx.to(dx.dtype.element_ty), mask=row_ok[:, None] & m_r)
    # Back through DropConnect (a fixed mask and scale) and the softmax: p * (g - sum_j p g).
    w_offs = w_base + (o_t[:, None] * ROW + o_k[None, :])
    w_ok = row_ok[:, None] & (o_k < K)[None, :]
    if DROP:
        g = tl.where(dropconnect_keep(seed_lo, w_offs, threshold), g * scale, 0.0)
    if SOFTMAX:
        lse_rows = tl.load(lse + pos0 * H + h, mask=row_ok, other=0.0)
        p = tl.exp(tl.load(weight + w_offs, mask=w_ok, other=float("-inf")).to(tl.float32) - lse_rows[:, None])
        g = p * (g - tl.sum(p * g, 1)[:, None])
    if ROW > 0:
        tl.store(dw + w_offs, g.to(dw.dtype.element_ty), mask=w_ok)
    else:
        tl.store(dw + (i_c * H + h).to(tl.int64) * K + o_k, tl.sum(g, 0), mask=o_k < K)


KERNELS = (dynamic_conv_output_fwd_kernel, dynamic_conv_dxdw_bwd_kernel)


def _launch_args(x, weight, chunking: Chunking, heads: int, pad_left: int, softmax: bool, drop):
    """Grid and keyword arguments shared by the forward and backward launches. ``drop`` is
    (seed_lo, threshold, scale) with threshold 0 when DropConnect is off."""
    C, K = x.shape[1], weight.shape[-1]
    seed_lo, threshold, scale = drop
    per_token = weight.dim() == 3
    meta = {
        "H": heads, "R": C // heads, "K": K, "P": pad_left, "ROW": heads * K if per_token else 0,
        "BT": CHUNK, "BK": triton.next_power_of_2(K), "SOFTMAX": softmax, "DROP": threshold > 0,
    }
    return (chunking.num_chunks * heads,), (chunking.chunk_index, chunking.cu_seqlens, seed_lo, threshold, scale), meta


def dynamic_conv_fwd(x, weight, chunking: Chunking, heads: int, pad_left: int, softmax: bool, drop):
    """x [L, C], weight [L, H, K] or [H, K]. Returns (out [L, C] in x's dtype, lse [L, H] float32 or None)."""
    L, C = x.shape
    grid, scalars, meta = _launch_args(x, weight, chunking, heads, pad_left, softmax, drop)
    out = empty(L, C, dtype=x.dtype, device=x.device)
    lse = empty(L, heads, dtype=torch.float32, device=x.device) if softmax else None
    dynamic_conv_output_fwd_kernel[grid](x, weight, out, lse, *scalars, **meta)
    return out, lse


def dynamic_conv_bwd(x, weight, lse, dout, chunking: Chunking, heads: int, pad_left: int, softmax: bool, drop):
    """Returns (dx [L, C] in x's dtype, dweight in weight's shape and dtype)."""
    L, C = x.shape
    K = weight.shape[-1]
    grid, scalars, meta = _launch_args(x, weight, chunking, heads, pad_left, softmax, drop)
    dx = empty(L, C, dtype=x.dtype, device=x.device)
    if weight.dim() == 3:
        dw = empty(L, heads, K, dtype=weight.dtype, device=x.device)
    else:
        dw = empty(chunking.num_chunks, heads, K, dtype=torch.float32, device=x.device)
    dynamic_conv_dxdw_bwd_kernel[grid](x, weight, lse, dout, dx, dw, *scalars, **meta)
    return dx, dw if weight.dim() == 3 else dw.sum(0).to(weight.dtype)
