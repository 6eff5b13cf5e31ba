"""Fused Triton kernels of the delta rule: chunked WY/UT form (forward, backward) and a recurrent decoder.

Inputs arrive packed: q, k ``[L, H, K]``, v ``[L, H, V]``, beta ``[L, H]`` with
``L`` the total number of tokens and sequence boundaries in a
:class:`~seqmix.kernels.sequences.Chunking`. The chunked forward runs three
kernels (docs/math/deltanet.md gives the algebra):

1. ``wy_fwd``: per chunk, ``A = tril_(diag(beta) K K^T)``, ``M = (I + A)^-1``,
   ``W = M diag(beta) K``, ``U = M diag(beta) V``. M is inverted in blocks of
   16 rows: forward substitution inside the four diagonal blocks, matmuls
   for the blocks below them, so the sequential part is 16 steps, not 64.
2. ``state_fwd``: per sequence and block of value channels, the only
   sequential pass: stores the state entering each chunk, ``V' = U - W S``,
   and ``S += K^T V'``.
3. ``output_fwd``: per chunk, ``O = scale (Q S + tril(Q K^T) V')``.

The forward keeps M (64 floats per token and head); the backward rebuilds W
and U from it and the per-chunk states by rerunning 2 (the states would cost
K*V values per chunk to keep), then runs four kernels: the intra-chunk part
of ``dV'``, the reverse state pass (the state gradient entering each chunk and
the full ``dV'``), ``dQ``/``dK``/``dW`` per chunk, and the WY backward that
turns ``dW``, ``dU`` into ``dK``, ``dV``, ``dbeta``.

Per-chunk kernels walk the key dim in slices of at most 64 (``BKC``) to keep
register tiles small; the two sequential kernels hold the whole key dim of
a [K, BV] state slice. Chunks and (sequence, head) pairs go on grid axis 0,
the only one not capped at 65535 programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmix.kernels.alloc import empty
from seqmix.kernels.sequences import Chunking
from seqmix.kernels.triton_common import (
    autotune,
    chunk_configs,
    chunk_local_cumsum,
    chunk_position,
    decay_ratio,
    dot_precision,
    key_value_blocks,
    load_matrix,
    load_row_values,
    load_rows,
    mm,
    sequence_bounds,
    sequence_program,
    state_configs,
    store_matrix,
    store_row_values,
    store_rows,
)
from seqmix.kernels.triton_limits import DELTA_RULE_CHUNK as CHUNK


@triton.jit
def _unit_lower_inverse(a, BC: tl.constexpr):
    """(I + a)^-1 for a strictly lower-triangular [BC, BC] a, by forward substitution:
    row i of the inverse is e_i - sum_{j<i} a_ij (row j of the inverse)."""
    o = tl.arange(0, BC)
    t = tl.zeros([BC, BC], dtype=tl.float32)
    for i in tl.static_range(BC):
        a_i = tl.sum(tl.where(o[:, None] == i, a, 0.0), 0)
        t_i = (o == i).to(tl.float32) - tl.sum(a_i[:, None] * t, 0)
        t = tl.where(o[:, None] == i, t_i[None, :], t)
    return t


@triton.jit
def _mm32(a, b):
    """A float32 matmul at full precision, for the small products that build M."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _kkt_blocks(k, beta, gcum, i_h, t0, nt, H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, BKC: tl.constexpr,
                PREC: tl.constexpr, USE_G: tl.constexpr):
    """The ten lower [BC, BC] blocks A_ij (j <= i) of tril_(diag(beta) K K^T) for a chunk of 4*BC rows,
    times the decay ratios exp(gcum_r - gcum_c) of the gated rule when USE_G."""
    DT = k.dtype.element_ty
    a00 = tl.zeros([BC, BC], dtype=tl.float32)
    a10, a11 = a00, a00
    a20, a21, a22 = a00, a00, a00
    a30, a31, a32, a33 = a00, a00, a00, a00
    for k0 in range(0, K, BKC):
        k_0 = load_rows(k + i_h * K, t0, nt, H * K, k0, K, BC, BKC)
        k_1 = load_rows(k + i_h * K, t0 + BC, nt - BC, H * K, k0, K, BC, BKC)
        k_2 = load_rows(k + i_h * K, t0 + 2 * BC, nt - 2 * BC, H * K, k0, K, BC, BKC)
        k_3 = load_rows(k + i_h * K, t0 + 3 * BC, nt - 3 * BC, H * K, k0, K, BC, BKC)
        a00 += mm(k_0, tl.trans(k_0), DT, PREC)
        a10 += mm(k_1, tl.trans(k_0), DT, PREC)
        a11 += mm(k_1, tl.trans(k_1), DT, PREC)
        a20 += mm(k_2, tl.trans(k_0), DT, PREC)
        a21 += mm(k_2, tl.trans(k_1), DT, PREC)
        a22 += mm(k_2, tl.trans(k_2), DT, PREC)
        a30 += mm(k_3, tl.trans(k_0), DT, PREC)
        a31 += mm(k_3, tl.trans(k_1), DT, PREC)
        a32 += mm(k_3, tl.trans(k_2), DT, PREC)
        a33 += mm(k_3, tl.trans(k_3), DT, PREC)
    b0 = load_row_values(beta + i_h, t0, nt, H, BC)[:, None]
    b1 = load_row_values(beta + i_h, t0 + BC, nt - BC, H, BC)[:, None]
    b2 = load_row_values(beta + i_h, t0 + 2 * BC, nt - 2 * BC, H, BC)[:, None]
    b3 = load_row_values(beta + i_h, t0 + 3 * BC, nt - 3 * BC, H, BC)[:, None]
    o = tl.arange(0, BC)
    strict = o[:, None] > o[None, :]
    a00, a11, a22, a33 = (tl.where(strict, a00 * b0, 0.0), tl.where(strict, a11 * b1, 0.0),
                          tl.where(strict, a22 * b2, 0.0), tl.where(strict, a33 * b3, 0.0))
    a10, a20, a21, a30, a31, a32 = a10 * b1, a20 * b2, a21 * b2, a30 * b3, a31 * b3, a32 * b3
    if USE_G:
        g0 = load_row_values(gcum + i_h, t0, nt, H, BC)
        g1 = load_row_values(gcum + i_h, t0 + BC, nt - BC, H, BC)
        g2 = load_row_values(gcum + i_h, t0 + 2 * BC, nt - 2 * BC, H, BC)
        g3 = load_row_values(gcum + i_h, t0 + 3 * BC, nt - 3 * BC, H, BC)
        # Rows past the chunk's end hold zeros: their ratios are masked, not formed.
        r0, r1, r2, r3 = ((o < nt)[:, None], (o < nt - BC)[:, None], (o < nt - 2 * BC)[:, None],
                          (o < nt - 3 * BC)[:, None])
        a00 *= decay_ratio(g0, g0, strict & r0)
        a10 *= decay_ratio(g1, g0, r1)
        a11 *= decay_ratio(g1, g1, strict & r1)
        a20 *= decay_ratio(g2, g0, r2)
        a21 *= decay_ratio(g2, g1, r2)
        a22 *= decay_ratio(g2, g2, strict & r2)
        a30 *= decay_ratio(g3, g0, r3)
        a31 *= decay_ratio(g3, g1, r3)
        a32 *= decay_ratio(g3, g2, r3)
        a33 *= decay_ratio(g3, g3, strict & r3)
    return a00, a10, a11, a20, a21, a22, a30, a31, a32, a33


@triton.jit
def _store_m_block(m_wy, x, i_h, t0, nt, r: tl.constexpr, c: tl.constexpr, H: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr):
    """Store block (r, c) of a chunk's M into m_wy [L, H, BT]."""
    store_rows(m_wy + i_h * BT, x, t0 + r * BC, nt - r * BC, H * BT, c * BC, BT, BC, BC)


@triton.jit
def _load_m(m_wy, i_h, t0, nt, H: tl.constexpr, BT: tl.constexpr):
    """A chunk's M as a [BT, BT] tile. Only its lower triangle is stored; the rest is zeroed here."""
    o_t = tl.arange(0, BT)
    b_m = load_rows(m_wy + i_h * BT, t0, nt, H * BT, 0, BT, BT, BT)
    return tl.where(o_t[:, None] >= o_t[None, :], b_m, 0.0)


@autotune(configs=chunk_configs(), key=["K", "V", "INVERT"])
@triton.jit
def delta_rule_wy_fwd_kernel(
    k, v, beta, gcum, w, u, m_wy, chunk_index, cu_seqlens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, INVERT: tl.constexpr,
    USE_G: tl.constexpr,
):
    """Per chunk: M = (I + tril_(diag(beta) K K^T))^-1 (only when INVERT; else M is read
    from m_wy), then W = M diag(beta) K and U = M diag(beta) V. With the gate (USE_G, gcum the
    in-chunk cumulative log decay): K K^T is taken times exp(gcum_i - gcum_j) and W = M diag(beta exp(gcum)) K."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    DT = k.dtype.element_ty
    BC: tl.constexpr = BT // 4
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    if INVERT:
        a00, a10, a11, a20, a21, a22, a30, a31, a32, a33 = _kkt_blocks(k, beta, gcum, i_h, t0, nt, H, K, BC, BKC, PREC, USE_G)
        m00 = _unit_lower_inverse(a00, BC)
        m11 = _unit_lower_inverse(a11, BC)
        m22 = _unit_lower_inverse(a22, BC)
        m33 = _unit_lower_inverse(a33, BC)
        # Below the diagonal: T_ij = -T_ii sum_{j <= m < i} A_im T_mj.
        m10 = -_mm32(m11, _mm32(a10, m00))
        m21 = -_mm32(m22, _mm32(a21, m11))
        m32 = -_mm32(m33, _mm32(a32, m22))
        m20 = -_mm32(m22, _mm32(a20, m00) + _mm32(a21, m10))
        m31 = -_mm32(m33, _mm32(a31, m11) + _mm32(a32, m21))
        m30 = -_mm32(m33, _mm32(a30, m00) + _mm32(a31, m10) + _mm32(a32, m20))
        _store_m_block(m_wy, m00, i_h, t0, nt, 0, 0, H, BT, BC)
        _store_m_block(m_wy, m10, i_h, t0, nt, 1, 0, H, BT, BC)
        _store_m_block(m_wy, m11, i_h, t0, nt, 1, 1, H, BT, BC)
        _store_m_block(m_wy, m20, i_h, t0, nt, 2, 0, H, BT, BC)
        _store_m_block(m_wy, m21, i_h, t0, nt, 2, 1, H, BT, BC)
        _store_m_block(m_wy, m22, i_h, t0, nt, 2, 2, H, BT, BC)
        _store_m_block(m_wy, m30, i_h, t0, nt, 3, 0, H, BT, BC)
        _store_m_block(m_wy, m31, i_h, t0, nt, 3, 1, H, BT, BC)
        _store_m_block(m_wy, m32, i_h, t0, nt, 3, 2, H, BT, BC)
        _store_m_block(m_wy, m33, i_h, t0, nt, 3, 3, H, BT, BC)
        # The chunk's M is read back whole so W and U are full-height matmuls.
        tl.debug_barrier()
    b_m = _load_m(m_wy, i_h, t0, nt, H, BT)
    b_beta = load_row_values(beta + i_h, t0, nt, H, BT)[:, None]
    b_wscale = b_beta
    if USE_G:
        b_wscale = b_beta * tl.exp(load_row_values(gcum + i_h, t0, nt, H, BT))[:, None]
    for k0 in range(0, K, BKC):
        b_kb = load_rows(k + i_h * K, t0, nt, H * K, k0, K, BT, BKC).to(tl.float32) * b_wscale
        store_rows(w + i_h * K, mm(b_m, b_kb, DT, PREC), t0, nt, H * K, k0, K, BT, BKC)
    for v0 in range(0, V, BV):
        b_vb = load_rows(v + i_h * V, t0, nt, H * V, v0, V, BT, BV).to(tl.float32) * b_beta
        store_rows(u + i_h * V, mm(b_m, b_vb, DT, PREC), t0, nt, H * V, v0, V, BT, BV)


@autotune(configs=state_configs("BV"), key=["K", "V"])
@triton.jit
def delta_rule_state_fwd_kernel(
    k, w, u, gcum, v_new, h, h0, ht, chunk_offsets, cu_seqlens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, USE_G: tl.constexpr,
):
    """Sequential over the chunks of one sequence: h[c] = S entering chunk c, V' = U - W S, S += K^T V'
    (gated: S = exp(gcum_C) S + (K exp(gcum_C - gcum))^T V', gcum_C the chunk's total log decay)."""
    i_h, i_v, bos, eos, c0, s_base = sequence_program(chunk_offsets, cu_seqlens, H, K * V)
    DT = k.dtype.element_ty
    v0 = i_v * BV
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_s += load_matrix(h0 + s_base, 0, K, v0, V, BK, BV)
    for i_t in range(tl.cdiv(eos - bos, BT)):
        t0 = bos + i_t * BT
        nt = tl.minimum(eos - t0, BT)
        store_matrix(h + ((c0 + i_t) * H + i_h) * K * V, b_s, 0, K, v0, V, BK, BV)
        b_w = load_rows(w + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        b_v = load_rows(u + i_h * V, t0, nt, H * V, v0, V, BT, BV).to(tl.float32) - mm(b_w, b_s, DT, PREC)
        store_rows(v_new + i_h * V, b_v, t0, nt, H * V, v0, V, BT, BV)
        b_k = load_rows(k + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        if USE_G:
            b_g = load_row_values(gcum + i_h, t0, nt, H, BT)
            b_last = tl.load(gcum + (t0 + nt - 1) * H + i_h)
            b_s *= tl.exp(b_last)
            b_k = b_k * tl.exp(b_last - b_g)[:, None]
        b_s += mm(tl.trans(b_k), b_v, DT, PREC)
    if STORE_HT:
        store_matrix(ht + s_base, b_s, 0, K, v0, V, BK, BV)


@autotune(configs=chunk_configs(), key=["K", "V"])
@triton.jit
def delta_rule_output_fwd_kernel(
    q, k, v_new, h, gcum, o, chunk_index, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, USE_G: tl.constexpr,
):
    """Per chunk and block of value channels: O = scale (Q S + tril(Q K^T) V')
    (gated: O = scale (exp(gcum) Q S + (tril(Q K^T) exp(gcum_i - gcum_j)) V'))."""
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DT = q.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    v0 = i_v * BV
    s_base = (i_c.to(tl.int64) * H + i_h) * K * V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in range(0, K, BKC):
        b_q = load_rows(q + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        b_k = load_rows(k + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        b_o += mm(b_q, load_matrix(h + s_base, k0, K, v0, V, BKC, BV), DT, PREC)
        b_a += mm(b_q, tl.trans(b_k), DT, PREC)
    o_t = tl.arange(0, BT)
    causal = o_t[:, None] >= o_t[None, :]
    if USE_G:
        b_g = load_row_values(gcum + i_h, t0, nt, H, BT)
        b_o *= tl.exp(b_g)[:, None]
        b_a *= decay_ratio(b_g, b_g, causal & (o_t < nt)[:, None])
    else:
        b_a = tl.where(causal, b_a, 0.0)
    b_o += mm(b_a, load_rows(v_new + i_h * V, t0, nt, H * V, v0, V, BT, BV), DT, PREC)
    store_rows(o + i_h * V, b_o * scale, t0, nt, H * V, v0, V, BT, BV)


@autotune(configs=chunk_configs(), key=["K", "V"])
@triton.jit
def delta_rule_dv_local_bwd_kernel(
    q, k, gcum, do, dv_local, chunk_index, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, USE_G: tl.constexpr,
):
    """Per chunk: the intra-chunk part of dV', scale tril(Q K^T)^T dO (gated: times exp(gcum_i - gcum_j))."""
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DT = q.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    v0 = i_v * BV
    # (K Q^T)_ji = (Q K^T)_ij, kept where i >= j.
    b_at = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in range(0, K, BKC):
        b_q = load_rows(q + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        b_k = load_rows(k + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        b_at += mm(b_k, tl.trans(b_q), DT, PREC)
    o_t = tl.arange(0, BT)
    if USE_G:
        b_g = load_row_values(gcum + i_h, t0, nt, H, BT)
        b_at *= tl.trans(decay_ratio(b_g, b_g, (o_t[:, None] >= o_t[None, :]) & (o_t < nt)[:, None])) * scale
    else:
        b_at = tl.where(o_t[:, None] <= o_t[None, :], b_at, 0.0) * scale
    b_dv = mm(b_at, load_rows(do + i_h * V, t0, nt, H * V, v0, V, BT, BV), DT, PREC)
    store_rows(dv_local + i_h * V, b_dv, t0, nt, H * V, v0, V, BT, BV)


@autotune(configs=state_configs("BV"), key=["K", "V"])
@triton.jit
def delta_rule_state_bwd_kernel(
    q, k, w, gcum, do, dv_local, du, dh, dht, dh0, chunk_offsets, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, USE_G: tl.constexpr,
):
    """Reverse over the chunks of one sequence.

    With dS the gradient of the state leaving chunk c: dh[c] = dS,
    dU = dV' = dV'_local + K dS, then dS <- dS + scale Q^T dO - W^T dV'.
    Gated: dU = dV'_local + (K exp(gcum_C - gcum)) dS, dS <- exp(gcum_C) dS + scale (exp(gcum) Q)^T dO - W^T dV'.
    """
    i_h, i_v, bos, eos, c0, s_base = sequence_program(chunk_offsets, cu_seqlens, H, K * V)
    DT = q.dtype.element_ty
    v0 = i_v * BV
    b_ds = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_ds += load_matrix(dht + s_base, 0, K, v0, V, BK, BV)
    NT = tl.cdiv(eos - bos, BT)
    for j in range(NT):
        i_t = NT - 1 - j
        t0 = bos + i_t * BT
        nt = tl.minimum(eos - t0, BT)
        store_matrix(dh + ((c0 + i_t) * H + i_h) * K * V, b_ds, 0, K, v0, V, BK, BV)
        b_k = load_rows(k + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        b_q = load_rows(q + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        if USE_G:
            b_g = load_row_values(gcum + i_h, t0, nt, H, BT)
            b_last = tl.load(gcum + (t0 + nt - 1) * H + i_h)
            b_k = b_k * tl.exp(b_last - b_g)[:, None]
            b_q = b_q * tl.exp(b_g)[:, None]
        b_du = load_rows(dv_local + i_h * V, t0, nt, H * V, v0, V, BT, BV) + mm(b_k, b_ds, DT, PREC)
        store_rows(du + i_h * V, b_du, t0, nt, H * V, v0, V, BT, BV)
        if USE_G:
            b_ds *= tl.exp(b_last)
        b_qt = tl.trans(b_q)
        b_wt = tl.trans(load_rows(w + i_h * K, t0, nt, H * K, 0, K, BT, BK))
        b_do = load_rows(do + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_ds += mm(b_qt, b_do, DT, PREC) * scale - mm(b_wt, b_du, DT, PREC)
    if STORE_DH0:
        store_matrix(dh0 + s_base, b_ds, 0, K, v0, V, BK, BV)


@autotune(configs=chunk_configs(), key=["K", "V"])
@triton.jit
def delta_rule_dqkw_bwd_kernel(
    q, k, v_new, h, dh, gcum, do, du, dq, dk, dw, dgcum, chunk_index, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, USE_G: tl.constexpr,
):
    """Per chunk and slice of the key dim, with S = h[c], dS = dh[c] and dP = tril(scale dO V'^T):
    dQ = scale dO S^T + dP K, dK = dP^T Q + V' dS^T (the W path comes later), dW = -dU S^T.

    Gated, with G_ij = exp(gcum_i - gcum_j): dQ = scale exp(gcum) dO S^T + (dP G) K, dK = (dP G)^T Q
    + exp(gcum_C - gcum) V' dS^T, and this slice's share of the gradient of the cumulative log decay,
    dgcum = rowsum(Q dQ) - rowsum(K dK), plus at the chunk's last row the terms of gcum_C:
    rowsum over the chunk of K (exp(gcum_C - gcum) V' dS^T) and exp(gcum_C) sum(S dS).
    dgcum is [L, H, number of key slices]; the launcher sums the slices.
    """
    i_c, i_kc, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DT = q.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    k0 = i_kc * BKC
    b_dq = tl.zeros([BT, BKC], dtype=tl.float32)
    b_dk = tl.zeros([BT, BKC], dtype=tl.float32)
    b_dw = tl.zeros([BT, BKC], dtype=tl.float32)
    b_dp = tl.zeros([BT, BT], dtype=tl.float32)
    b_sds = tl.zeros([BKC], dtype=tl.float32)
    s_base = (i_c.to(tl.int64) * H + i_h) * K * V
    for v0 in range(0, V, BV):
        b_ht = tl.trans(load_matrix(h + s_base, k0, K, v0, V, BKC, BV))
        b_dht = tl.trans(load_matrix(dh + s_base, k0, K, v0, V, BKC, BV))
        b_vn = load_rows(v_new + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_do = load_rows(do + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_du = load_rows(du + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_dq += mm(b_do, b_ht, DT, PREC)
        b_dp += mm(b_do, tl.trans(b_vn), DT, PREC)
        b_dk += mm(b_vn, b_dht, DT, PREC)
        b_dw -= mm(b_du, b_ht, DT, PREC)
        if USE_G:
            b_sds += tl.sum(b_ht.to(tl.float32) * b_dht.to(tl.float32), 0)
    o_t = tl.arange(0, BT)
    causal = o_t[:, None] >= o_t[None, :]
    b_q = load_rows(q + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
    b_k = load_rows(k + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
    if USE_G:
        b_g = load_row_values(gcum + i_h, t0, nt, H, BT)
        b_last = tl.load(gcum + (t0 + nt - 1) * H + i_h)
        b_dq *= tl.exp(b_g)[:, None]
        b_dp *= decay_ratio(b_g, b_g, causal & (o_t < nt)[:, None]) * scale
        b_dk *= tl.exp(b_last - b_g)[:, None]
    else:
        b_dp = tl.where(causal, b_dp, 0.0) * scale
    b_dq = b_dq * scale + mm(b_dp, b_k, DT, PREC)
    b_dk_intra = mm(tl.trans(b_dp), b_q, DT, PREC)
    if USE_G:
        b_kf = b_k.to(tl.float32)
        b_k_state = tl.sum(b_dk * b_kf, 1)
        b_dgcum = tl.sum(b_dq * b_q.to(tl.float32), 1) - tl.sum(b_dk_intra * b_kf, 1) - b_k_state
        b_dgcum += tl.where(o_t == nt - 1, tl.sum(b_k_state, 0) + tl.exp(b_last) * tl.sum(b_sds, 0), 0.0)
        n_slices = tl.num_programs(1)
        store_row_values(dgcum + i_h * n_slices + i_kc, b_dgcum, t0, nt, H * n_slices, BT)
    b_dk += b_dk_intra
    store_rows(dq + i_h * K, b_dq, t0, nt, H * K, k0, K, BT, BKC)
    store_rows(dk + i_h * K, b_dk, t0, nt, H * K, k0, K, BT, BKC)
    store_rows(dw + i_h * K, b_dw, t0, nt, H * K, k0, K, BT, BKC)


@autotune(configs=chunk_configs(), key=["K", "V"])
@triton.jit
def delta_rule_wy_bwd_kernel(
    k, v, beta, gcum, m_wy, dw, du, dk_other, dk, dv, dbeta, dgcum, chunk_index, cu_seqlens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, USE_G: tl.constexpr,
):
    """Per chunk, from dW and dU back to K, V and beta through W = M diag(beta) K,
    U = M diag(beta) V and M = (I + A)^-1 (dA = -M^T dM M^T), A = tril_(diag(beta) K K^T).
    dk_other is the key gradient of the other paths; dk gets the total.

    Gated (W = M diag(beta exp(gcum)) K, A = tril_(diag(beta) (K K^T) G), G_ij = exp(gcum_i - gcum_j)):
    the W path's beta terms carry exp(gcum), dA is taken times G, and dgcum [L, H] gets the
    cumulative log decay's gradient through W and A: with E = (dA G) (K K^T),
    dgcum = beta exp(gcum) rowsum((M^T dW) K) + beta rowsum(E) - colsum(diag(beta) E)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    DT = k.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    b_mt = tl.trans(_load_m(m_wy, i_h, t0, nt, H, BT))
    b_beta = load_row_values(beta + i_h, t0, nt, H, BT)
    b_wscale = b_beta
    if USE_G:
        b_g = load_row_values(gcum + i_h, t0, nt, H, BT)
        b_wscale = b_beta * tl.exp(b_g)
    b_dt = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for v0 in range(0, V, BV):
        b_v = load_rows(v + i_h * V, t0, nt, H * V, v0, V, BT, BV).to(tl.float32)
        b_du = load_rows(du + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_dt += mm(b_du, tl.trans(b_v * b_beta[:, None]), DT, PREC)
        b_dvb = mm(b_mt, b_du, DT, PREC)
        b_dbeta += tl.sum(b_dvb * b_v, 1)
        store_rows(dv + i_h * V, b_dvb * b_beta[:, None], t0, nt, H * V, v0, V, BT, BV)
    # First pass over the key dim: dM and beta's share through W, and K K^T for the A path.
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    b_rw = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(0, K, BKC):
        b_k = load_rows(k + i_h * K, t0, nt, H * K, k0, K, BT, BKC).to(tl.float32)
        b_dw = load_rows(dw + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        b_dt += mm(b_dw, tl.trans(b_k * b_wscale[:, None]), DT, PREC)
        b_rw += tl.sum(mm(b_mt, b_dw, DT, PREC) * b_k, 1)
        b_kk += mm(b_k, tl.trans(b_k), DT, PREC)
    o_t = tl.arange(0, BT)
    strict = o_t[:, None] > o_t[None, :]
    b_da = -mm(mm(b_mt, b_dt, DT, PREC), b_mt, DT, PREC)
    if USE_G:
        b_da *= decay_ratio(b_g, b_g, strict & (o_t < nt)[:, None])
        b_dbeta += b_rw * tl.exp(b_g)
    else:
        b_da = tl.where(strict, b_da, 0.0)
        b_dbeta += b_rw
    b_e = b_da * b_kk
    b_dbeta += tl.sum(b_e, 1)
    store_row_values(dbeta + i_h, b_dbeta, t0, nt, H, BT)
    if USE_G:
        b_dgcum = b_wscale * b_rw + b_beta * tl.sum(b_e, 1) - tl.sum(b_e * b_beta[:, None], 0)
        store_row_values(dgcum + i_h, b_dgcum, t0, nt, H, BT)
    # Second pass: dK = dK_other + diag(beta) M^T dW + diag(beta) dA K + dA^T diag(beta) K.
    b_dab = b_da * b_beta[:, None]
    for k0 in range(0, K, BKC):
        b_k = load_rows(k + i_h * K, t0, nt, H * K, k0, K, BT, BKC).to(tl.float32)
        b_dw = load_rows(dw + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        b_dk = load_rows(dk_other + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        b_dk += mm(b_mt, b_dw, DT, PREC) * b_wscale[:, None]
        b_dk += mm(b_dab, b_k, DT, PREC) + mm(tl.trans(b_da), b_k * b_beta[:, None], DT, PREC)
        store_rows(dk + i_h * K, b_dk, t0, nt, H * K, k0, K, BT, BKC)


@autotune(configs=state_configs("BV"), key=["K", "V"])
@triton.jit
def delta_rule_recurrent_fwd_kernel(
    q, k, v, beta, g, o, h0, ht, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, USE_G: tl.constexpr,
):
    """One token at a time, the state in registers: for decoding and short prefills.
    Gated (USE_G): the state decays by exp(g_t) before each token's update."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    v0 = i_v * BV
    o_k = tl.arange(0, BK)
    o_v = v0 + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    s_base = i_nh.to(tl.int64) * K * V
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_s += load_matrix(h0 + s_base, 0, K, v0, V, BK, BV)
    for t in range(bos, eos):
        b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + t * H + i_h).to(tl.float32)
        if USE_G:
            b_s *= tl.exp(tl.load(g + t * H + i_h).to(tl.float32))
        b_vn = b_v - tl.sum(b_s * b_k[:, None], 0)
        b_s += (b_k * b_beta)[:, None] * b_vn[None, :]
        b_o = tl.sum(b_s * b_q[:, None], 0) * scale
        tl.store(o + (t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        store_matrix(ht + s_base, b_s, 0, K, v0, V, BK, BV)


KERNELS = (
    delta_rule_wy_fwd_kernel,
    delta_rule_state_fwd_kernel,
    delta_rule_output_fwd_kernel,
    delta_rule_dv_local_bwd_kernel,
    delta_rule_state_bwd_kernel,
    delta_rule_dqkw_bwd_kernel,
    delta_rule_wy_bwd_kernel,
    delta_rule_recurrent_fwd_kernel,
)


def _wy(k, v, beta, gcum, m_wy, chunking: Chunking, invert: bool, sizes, prec):
    """Kernel 1: W and U per chunk; M is inverted into m_wy when ``invert``, else read from it."""
    L, H, K = k.shape
    V = v.shape[-1]
    w = empty(L, H, K, dtype=k.dtype, device=k.device)
    u = empty(L, H, V, dtype=k.dtype, device=k.device)
    delta_rule_wy_fwd_kernel[(chunking.num_chunks, H)](
        k, v, beta, gcum, w, u, m_wy, chunking.chunk_index, chunking.cu_seqlens,
        H=H, K=K, V=V, BT=CHUNK, BKC=sizes["BKC"], BV=sizes["BV"], PREC=prec, INVERT=invert, USE_G=gcum is not None,
    )
    return w, u


def _states(k, w, u, gcum, h0, chunking: Chunking, store_final: bool, sizes, prec):
    """Kernel 2: the state entering each chunk, V', and the final state."""
    L, H, K = k.shape
    V = u.shape[-1]
    N = chunking.num_sequences
    h = empty(chunking.num_chunks, H, K, V, dtype=k.dtype, device=k.device)
    v_new = empty(L, H, V, dtype=k.dtype, device=k.device)
    ht = empty(N, H, K, V, dtype=torch.float32, device=k.device) if store_final else None
    delta_rule_state_fwd_kernel[lambda meta: (N * H, triton.cdiv(V, meta["BV"]))](
        k, w, u, gcum, v_new, h, h0, ht, chunking.chunk_offsets, chunking.cu_seqlens,
        H=H, K=K, V=V, BT=CHUNK, BK=sizes["BK"], PREC=prec, HAS_H0=h0 is not None, STORE_HT=store_final,
        USE_G=gcum is not None,
    )
    return h, v_new, ht


def chunk_delta_rule_fwd(q, k, v, beta, gcum, scale, h0, chunking: Chunking, store_final: bool):
    """Chunked forward; ``gcum`` ([L, H] float32 in-chunk cumulative log decays, from
    :func:`chunk_local_cumsum`) selects the gated rule, None the plain one. Returns
    (o [L, H, V], final state [N, H, K, V] float32 or None, m_wy [L, H, 64] float32 for the backward)."""
    L, H, K = q.shape
    V = v.shape[-1]
    sizes, prec = key_value_blocks(K, V), dot_precision(q.dtype)
    m_wy = empty(L, H, CHUNK, dtype=torch.float32, device=q.device)
    w, u = _wy(k, v, beta, gcum, m_wy, chunking, True, sizes, prec)
    h, v_new, ht = _states(k, w, u, gcum, h0, chunking, store_final, sizes, prec)
    o = empty(L, H, V, dtype=q.dtype, device=q.device)
    delta_rule_output_fwd_kernel[(chunking.num_chunks, triton.cdiv(V, sizes["BV"]), H)](
        q, k, v_new, h, gcum, o, chunking.chunk_index, chunking.cu_seqlens, scale,
        H=H, K=K, V=V, BT=CHUNK, BKC=sizes["BKC"], BV=sizes["BV"], PREC=prec, USE_G=gcum is not None,
    )
    return o, ht, m_wy


def chunk_delta_rule_bwd(q, k, v, beta, gcum, m_wy, scale, h0, chunking: Chunking, do, dht, need_dh0: bool):
    """Chunked backward. Returns (dq, dk, dv, dbeta) in the inputs' dtypes, dg ([L, H] float32,
    the gradient of the per-token log decays; None without ``gcum``) and dh0 (float32) or None."""
    L, H, K = q.shape
    V = v.shape[-1]
    sizes, prec = key_value_blocks(K, V), dot_precision(q.dtype)
    BKC, BV = sizes["BKC"], sizes["BV"]
    N, NC = chunking.num_sequences, chunking.num_chunks
    idx, cu = chunking.chunk_index, chunking.cu_seqlens
    dev = q.device
    use_g = gcum is not None
    w, u = _wy(k, v, beta, gcum, m_wy, chunking, False, sizes, prec)
    h, v_new, _ = _states(k, w, u, gcum, h0, chunking, False, sizes, prec)
    dv_local = empty(L, H, V, dtype=torch.float32, device=dev)
    delta_rule_dv_local_bwd_kernel[(NC, triton.cdiv(V, BV), H)](
        q, k, gcum, do, dv_local, idx, cu, scale, H=H, K=K, V=V, BT=CHUNK, BKC=BKC, BV=BV, PREC=prec, USE_G=use_g,
    )
    dh = empty(NC, H, K, V, dtype=q.dtype, device=dev)
    du = empty(L, H, V, dtype=torch.float32, device=dev)
    dh0 = empty(N, H, K, V, dtype=torch.float32, device=dev) if need_dh0 else None
    delta_rule_state_bwd_kernel[lambda meta: (N * H, triton.cdiv(V, meta["BV"]))](
        q, k, w, gcum, do, dv_local, du, dh, dht, dh0, chunking.chunk_offsets, cu, scale,
        H=H, K=K, V=V, BT=CHUNK, BK=sizes["BK"], PREC=prec, HAS_DHT=dht is not None, STORE_DH0=need_dh0,
        USE_G=use_g,
    )
    dq = empty(L, H, K, dtype=q.dtype, device=dev)
    dk_other = empty(L, H, K, dtype=torch.float32, device=dev)
    dw = empty(L, H, K, dtype=torch.float32, device=dev)
    n_slices = triton.cdiv(K, BKC)
    dgcum_qk = empty(L, H, n_slices, dtype=torch.float32, device=dev) if use_g else None
    delta_rule_dqkw_bwd_kernel[(NC, n_slices, H)](
        q, k, v_new, h, dh, gcum, do, du, dq, dk_other, dw, dgcum_qk, idx, cu, scale,
        H=H, K=K, V=V, BT=CHUNK, BKC=BKC, BV=BV, PREC=prec, USE_G=use_g,
    )
    dk = empty(L, H, K, dtype=k.dtype, device=dev)
    dv = empty(L, H, V, dtype=v.dtype, device=dev)
    dbeta = empty(L, H, dtype=beta.dtype, device=dev)
    dgcum_wy = empty(L, H, dtype=torch.float32, device=dev) if use_g else None
    delta_rule_wy_bwd_kernel[(NC, H)](
        k, v, beta, gcum, m_wy, dw, du, dk_other, dk, dv, dbeta, dgcum_wy, idx, cu,
        H=H, K=K, V=V, BT=CHUNK, BKC=BKC, BV=BV, PREC=prec, USE_G=use_g,
    )
    # gcum is the in-chunk cumulative sum of g, so dg is the reverse in-chunk cumulative sum of dgcum.
    dg = chunk_local_cumsum(dgcum_wy + dgcum_qk.sum(-1), chunking, reverse=True) if use_g else None
    return dq, dk, dv, dbeta, dg, dh0


def recurrent_delta_rule_fwd(q, k, v, beta, g, scale, h0, cu_seqlens: torch.Tensor, store_final: bool):
    """Token-by-token forward (no backward): decoding and short prefills; ``g`` ([L, H] log decays)
    selects the gated rule, None the plain one. Returns (o, final state or None)."""
    L, H, K = q.shape
    V = v.shape[-1]
    sizes = key_value_blocks(K, V)
    N = cu_seqlens.numel() - 1
    o = empty(L, H, V, dtype=q.dtype, device=q.device)
    ht = empty(N, H, K, V, dtype=torch.float32, device=q.device) if store_final else None
    delta_rule_recurrent_fwd_kernel[lambda meta: (N * H, triton.cdiv(V, meta["BV"]))](
        q, k, v, beta, g, o, h0, ht, cu_seqlens, scale,
        H=H, K=K, V=V, BK=sizes["BK"], HAS_H0=h0 is not None, STORE_HT=store_final, USE_G=g is not None,
    )
    return o, ht
