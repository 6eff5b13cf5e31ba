"""Fused Triton kernels of the short causal depthwise convolution, forward and backward
(docs/math/conv.md).

Inputs arrive packed: x ``[L, D]`` with sequence boundaries in a
:class:`~seqmix.kernels.sequences.Chunking`; one program handles a chunk of
``BT`` tokens of one sequence and ``BD`` channels. Tap j of token t reads
``x[t - (W-1-j)]``; a position before the sequence start reads the initial
state (the last W-1 inputs before it, oldest first) or zero.

The backward recomputes the pre-activation, writes ``dz`` (the gradient
before the activation) and per-chunk partial sums of the weight and bias
gradients, then gathers ``dx`` and the initial state's gradient from ``dz``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmix.kernels.alloc import empty
from seqmix.kernels.sequences import Chunking
from seqmix.kernels.triton_common import autotune, autotune_configs, chunk_position, sequence_bounds
from seqmix.kernels.triton_limits import CONV_CHUNK as CHUNK


def _configs():
    return autotune_configs([triton.Config({"BD": bd}, num_warps=w) for bd, w in ((64, 8), (32, 4), (32, 8), (128, 8))])


@triton.jit
def _tap(x, h0, i_n, t0, nt, rel0, shift, o_d, D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
         HAS_H0: tl.constexpr):
    """The [BT, BD] inputs ``shift`` tokens back from tokens t0 .. t0+nt-1, whose offsets from the
    sequence start begin at rel0: x where the position is inside the sequence, else the state."""
    o_t = tl.arange(0, BT)
    rel = rel0.to(tl.int32) + o_t - shift  # a position within one sequence fits in int32
    m = (o_t < nt)[:, None] & (o_d < D)[None, :]
    val = tl.load(x + (t0 - shift).to(tl.int64) * D + (o_t[:, None] * D + o_d[None, :]),
                  mask=m & (rel >= 0)[:, None], other=0.0).to(tl.float32)
    if HAS_H0:
        p_s = h0 + i_n * D * (W - 1) + o_d[None, :] * (W - 1) + (W - 1 + rel)[:, None]
        val += tl.load(p_s, mask=m & (rel < 0)[:, None], other=0.0)
    return val


@triton.jit
def _pre_activation(x, weight, bias, h0, i_n, t0, nt, rel0, o_d, D: tl.constexpr, W: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr):
    """bias + sum_j weight[:, j] * x[t - (W-1-j)] for a [BT, BD] tile, in float32."""
    m_d = o_d < D
    z = tl.zeros([BT, BD], dtype=tl.float32)
    if HAS_BIAS:
        z += tl.load(bias + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    # The tap loops stay rolled (range, not static_range): unrolled, the compiler hoists every tap's loads and a
    # width-31 kernel spills.
    for j in range(W):
        w_j = tl.load(weight + o_d * W + j, mask=m_d, other=0.0).to(tl.float32)
        z += w_j[None, :] * _tap(x, h0, i_n, t0, nt, rel0, W - 1 - j, o_d, D, W, BT, HAS_H0)
    return z


@autotune(configs=_configs(), key=["D", "W"])
@triton.jit
def causal_conv1d_output_fwd_kernel(
    x, weight, bias, h0, out, chunk_index, cu_seqlens,
    D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SILU: tl.constexpr,
):
    """out = act(bias + sum_j weight[:, j] x[t - (W-1-j)]) for one chunk of tokens and channels."""
    i_c, i_d = tl.program_id(0), tl.program_id(1)
    i_n, i_t, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    z = _pre_activation(x, weight, bias, h0, i_n, t0, nt, i_t * BT, o_d, D, W, BT, BD, HAS_BIAS, HAS_H0)
    if SILU:
        z = z * tl.sigmoid(z)
    o_t = tl.arange(0, BT)
    m = (o_t < nt)[:, None] & (o_d < D)[None, :]
    tl.store(out + t0 * D + (o_t[:, None] * D + o_d[None, :]), z.to(out.dtype.element_ty), mask=m)


@autotune(configs=_configs(), key=["D", "W"])
@triton.jit
def causal_conv1d_final_state_fwd_kernel(
    x, h0, ht, cu_seqlens, D: tl.constexpr, W: tl.constexpr, BD: tl.constexpr, HAS_H0: tl.constexpr,
):
    """ht[n, :, m] = the input W-1-m tokens before the end of sequence n (from the state if before its start)."""
    i_n, i_d = tl.program_id(0), tl.program_id(1)
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    for m in range(W - 1):
        rel = eos - bos - (W - 1) + m
        # Masks combine blocks only: Triton 3.9's interpreter refuses a block & a scalar.
        rel_d = rel + tl.zeros([BD], dtype=tl.int64)
        val = tl.load(x + (bos + rel) * D + o_d, mask=m_d & (rel_d >= 0), other=0.0).to(tl.float32)
        if HAS_H0:
            p_s = h0 + i_n * D * (W - 1) + o_d * (W - 1) + (W - 1 + rel)
            val += tl.load(p_s, mask=m_d & (rel_d < 0), other=0.0)
        tl.store(ht + i_n * D * (W - 1) + o_d * (W - 1) + m, val, mask=m_d)


@autotune(configs=_configs(), key=["D", "W"])
@triton.jit
def causal_conv1d_dz_bwd_kernel(
    x, weight, bias, h0, dout, dz, dw_part, db_part, chunk_index, cu_seqlens,
    D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SILU: tl.constexpr,
):
    """dz = dout * act'(z) for one chunk, and the chunk's sums of dz * tap_j (weight) and dz (bias)."""
    i_c, i_d = tl.program_id(0), tl.program_id(1)
    i_n, i_t, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_t = tl.arange(0, BT)
    m = (o_t < nt)[:, None] & m_d[None, :]
    offs = t0 * D + (o_t[:, None] * D + o_d[None, :])
    b_dz = tl.load(dout + offs, mask=m, other=0.0).to(tl.float32)
    if SILU:
        z = _pre_activation(x, weight, bias, h0, i_n, t0, nt, i_t * BT, o_d, D, W, BT, BD, HAS_BIAS, HAS_H0)
        s = tl.sigmoid(z)
        b_dz = b_dz * s * (1 + z * (1 - s))
    tl.store(dz + offs, b_dz, mask=m)
    part = i_c.to(tl.int64) * W * D
    for j in range(W):
        tap = _tap(x, h0, i_n, t0, nt, i_t * BT, W - 1 - j, o_d, D, W, BT, HAS_H0)
        tl.store(dw_part + part + j * D + o_d, tl.sum(b_dz * tap, 0), mask=m_d)
    if HAS_BIAS:
        tl.store(db_part + i_c.to(tl.int64) * D + o_d, tl.sum(b_dz, 0), mask=m_d)


@autotune(configs=_configs(), key=["D", "W"])
@triton.jit
def causal_conv1d_dx_bwd_kernel(
    weight, dz, dht, dx, chunk_index, cu_seqlens,
    D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_DHT: tl.constexpr,
):
    """dx[p] = sum_j weight[:, j] dz[p + (W-1-j)] over outputs inside the sequence, plus the final
    state's gradient for the last W-1 inputs."""
    i_c, i_d = tl.program_id(0), tl.program_id(1)
    i_n, i_t, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_t = tl.arange(0, BT)
    m = (o_t < nt)[:, None] & m_d[None, :]
    b_dx = tl.zeros([BT, BD], dtype=tl.float32)
    for j in range(W):
        shift = W - 1 - j
        w_j = tl.load(weight + o_d * W + j, mask=m_d, other=0.0).to(tl.float32)
        inside = t0 + o_t + shift < eos
        p_dz = dz + (t0 + shift) * D + (o_t[:, None] * D + o_d[None, :])
        b_dx += w_j[None, :] * tl.load(p_dz, mask=m & inside[:, None], other=0.0)
    if HAS_DHT:
        # Input p is entry m = p - (eos - (W-1)) of the final state when m >= 0.
        fm = t0 + o_t - (eos - (W - 1))
        p_ht = dht + i_n * D * (W - 1) + o_d[None, :] * (W - 1) + fm[:, None]
        b_dx += tl.load(p_ht, mask=m & (fm >= 0)[:, None], other=0.0)
    tl.store(dx + t0 * D + (o_t[:, None] * D + o_d[None, :]), b_dx.to(dx.dtype.element_ty), mask=m)


@autotune(configs=_configs(), key=["D", "W"])
@triton.jit
def causal_conv1d_dh0_bwd_kernel(
    weight, dz, dht, dh0, cu_seqlens, D: tl.constexpr, W: tl.constexpr, BD: tl.constexpr, HAS_DHT: tl.constexpr,
):
    """Gradient of initial-state entry s (the input W-1-s tokens before the sequence start): the
    outputs whose taps read it, and the final state when the sequence is shorter than W-1."""
    i_n, i_d = tl.program_id(0), tl.program_id(1)
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    for s in range(W - 1):
        rel = s - (W - 1)
        acc = tl.zeros([BD], dtype=tl.float32)
        for j in range(W):
            # The output reading this entry through tap j, relative to bos (as a block: see
            # causal_conv1d_final_state_fwd_kernel).
            t = rel + (W - 1 - j) + tl.zeros([BD], dtype=tl.int64)
            w_j = tl.load(weight + o_d * W + j, mask=m_d, other=0.0).to(tl.float32)
            ok = (t >= 0) & (t < eos - bos)
            acc += w_j * tl.load(dz + (bos + t) * D + o_d, mask=m_d & ok, other=0.0)
        if HAS_DHT:
            fm = bos + rel - (eos - (W - 1)) + tl.zeros([BD], dtype=tl.int64)
            acc += tl.load(dht + i_n * D * (W - 1) + o_d * (W - 1) + fm, mask=m_d & (fm >= 0), other=0.0)
        tl.store(dh0 + i_n * D * (W - 1) + o_d * (W - 1) + s, acc, mask=m_d)


# restore_value: the kernel updates the state in place, and autotuning runs every config on the same arguments;
# without the restore each timed run advanced the state again (the GPU tests of the decoding paths that take
# this kernel failed at their small shapes, where the parity check, one config and no autotuning, passed).
@autotune(configs=_configs(), key=["D", "W"], restore_value=["state"])
@triton.jit
def causal_conv1d_update_fwd_kernel(
    x, state, weight, bias, out, T, D: tl.constexpr, W: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    """Decoding: T new tokens of sequence n continue from its state [D, W-1] (oldest first); writes
    their outputs, then the state after them in place."""
    i_n, i_d = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    p_x = x + i_n.to(tl.int64) * T * D + o_d
    p_s = state + i_n.to(tl.int64) * D * (W - 1) + o_d * (W - 1)
    for t in range(T):
        z = tl.zeros([BD], dtype=tl.float32)
        if HAS_BIAS:
            z += tl.load(bias + o_d, mask=m_d, other=0.0).to(tl.float32)
        for j in range(W):
            z += tl.load(weight + o_d * W + j, mask=m_d, other=0.0).to(tl.float32) * _window(p_x, p_s, t - (W - 1) + j, m_d, D, W)
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(out + i_n.to(tl.int64) * T * D + t * D + o_d, z.to(out.dtype.element_ty), mask=m_d)
    # Every read of the old state is done before any entry is overwritten.
    tl.debug_barrier()
    for m in range(W - 1):
        val = _window(p_x, p_s, T - (W - 1) + m, m_d, D, W)
        tl.store(p_s + m, val.to(state.dtype.element_ty), mask=m_d)


@triton.jit
def _window(p_x, p_s, pos, m_d, D: tl.constexpr, W: tl.constexpr):
    """Input ``pos`` of the new tokens (negative: the state entry W-1+pos), float32 [BD]."""
    # Masks combine blocks only: Triton 3.9's interpreter refuses a block & a scalar.
    pos_d = pos + tl.zeros_like(m_d.to(tl.int32))
    val = tl.load(p_x + pos * D, mask=m_d & (pos_d >= 0), other=0.0).to(tl.float32)
    return val + tl.load(p_s + (W - 1 + pos), mask=m_d & (pos_d < 0), other=0.0).to(tl.float32)


KERNELS = (
    causal_conv1d_output_fwd_kernel,
    causal_conv1d_final_state_fwd_kernel,
    causal_conv1d_dz_bwd_kernel,
    causal_conv1d_dx_bwd_kernel,
    causal_conv1d_dh0_bwd_kernel,
    causal_conv1d_update_fwd_kernel,
)


def _chunk_grid(chunking: Chunking, D: int):
    return lambda meta: (chunking.num_chunks, triton.cdiv(D, meta["BD"]))


def _seq_grid(n: int, D: int):
    return lambda meta: (n, triton.cdiv(D, meta["BD"]))


def causal_conv1d_fwd(x, weight, bias, h0, chunking: Chunking, silu: bool, store_final: bool):
    """x [L, D]. Returns (out [L, D] in x's dtype, final state [N, D, W-1] float32 or None)."""
    L, D = x.shape
    W = weight.shape[1]
    N = chunking.num_sequences
    out = empty(L, D, dtype=x.dtype, device=x.device)
    causal_conv1d_output_fwd_kernel[_chunk_grid(chunking, D)](
        x, weight, bias, h0, out, chunking.chunk_index, chunking.cu_seqlens,
        D=D, W=W, BT=CHUNK, HAS_BIAS=bias is not None, HAS_H0=h0 is not None, SILU=silu,
    )
    ht = None
    if store_final:
        ht = empty(N, D, W - 1, dtype=torch.float32, device=x.device)
        causal_conv1d_final_state_fwd_kernel[_seq_grid(N, D)](
            x, h0, ht, chunking.cu_seqlens, D=D, W=W, HAS_H0=h0 is not None,
        )
    return out, ht


def causal_conv1d_bwd(x, weight, bias, h0, chunking: Chunking, silu: bool, dout, dht, need_dh0: bool):
    """Returns (dx in x's dtype, dweight, dbias or None, dh0 or None), the last three float32."""
    L, D = x.shape
    W = weight.shape[1]
    N, NC = chunking.num_sequences, chunking.num_chunks
    dz = empty(L, D, dtype=torch.float32, device=x.device)
    dw_part = empty(NC, W, D, dtype=torch.float32, device=x.device)
    db_part = empty(NC, D, dtype=torch.float32, device=x.device) if bias is not None else None
    causal_conv1d_dz_bwd_kernel[_chunk_grid(chunking, D)](
        x, weight, bias, h0, dout, dz, dw_part, db_part, chunking.chunk_index, chunking.cu_seqlens,
        D=D, W=W, BT=CHUNK, HAS_BIAS=bias is not None, HAS_H0=h0 is not None, SILU=silu,
    )
    dx = empty(L, D, dtype=x.dtype, device=x.device)
    causal_conv1d_dx_bwd_kernel[_chunk_grid(chunking, D)](
        weight, dz, dht, dx, chunking.chunk_index, chunking.cu_seqlens,
        D=D, W=W, BT=CHUNK, HAS_DHT=dht is not None,
    )
    dh0 = None
    if need_dh0:
        dh0 = empty(N, D, W - 1, dtype=torch.float32, device=x.device)
        causal_conv1d_dh0_bwd_kernel[_seq_grid(N, D)](
            weight, dz, dht, dh0, chunking.cu_seqlens, D=D, W=W, HAS_DHT=dht is not None,
        )
    dweight = dw_part.sum(0).t()
    dbias = None if db_part is None else db_part.sum(0)
    return dx, dweight, dbias, dh0


def causal_conv1d_update(x, state, weight, bias, silu: bool):
    """x [N, T, D] contiguous, state [N, D, W-1] contiguous (updated in place). Returns out [N, T, D]."""
    N, T, D = x.shape
    W = weight.shape[1]
    out = empty(N, T, D, dtype=x.dtype, device=x.device)
    causal_conv1d_update_fwd_kernel[_seq_grid(N, D)](x, state, weight, bias, out, T, D=D, W=W,
                                                 HAS_BIAS=bias is not None, SILU=silu)
    return out
