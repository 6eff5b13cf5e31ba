"""Fused Triton kernels of the delta rule: chunked WY/UT form (forward, backward) and a recurrent decoder.

Inputs arrive packed: q, k ``[L, H, K]``, v ``[L, H, V]``, beta ``[L, H]`` with
``L`` the total number of tokens and sequence boundaries in a
:class:`~seqmix.kernels.sequences.Chunking`. The chunked forward runs three
kernels (``../shared/MATH.md`` gives the algebra):

1. ``wy_fwd``: per chunk, ``A = tril_(diag(beta) K K^T)``, ``T = (I + A)^-1``,
   ``W = T diag(beta) K``, ``U = T diag(beta) V``. T is inverted in blocks of
   16 rows: forward substitution inside the four diagonal blocks, matmuls
   for the blocks below them, so the sequential part is 16 steps, not 64.
2. ``state_fwd``: per sequence and block of value channels, the only
   sequential pass: stores the state entering each chunk, ``V' = U - W S``,
   and ``S += K^T V'``.
3. ``output_fwd``: per chunk, ``O = scale (Q S + tril(Q K^T) V')``.

The forward keeps T (64 floats per token and head); the backward rebuilds W
and U from it and the per-chunk states by rerunning 2 (the states would cost
K*V values per chunk to keep), then runs four kernels: the intra-chunk part
of ``dV'``, the reverse state pass (the state gradient entering each chunk and
the full ``dV'``), ``dQ``/``dK``/``dW`` per chunk, and the WY backward that
turns ``dW``, ``dU`` into ``dK``, ``dV``, ``dbeta``.

Per-chunk kernels walk the key dim in slices of at most 64 (``BKC``) to keep
register tiles small; the two sequential kernels hold the whole key dim of
a [K, BV] state slice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmix.kernels.alloc import empty
from seqmix.kernels.sequences import Chunking
from seqmix.kernels.triton_common import (
    autotune_configs,
    chunk_position,
    dot_precision,
    head_block,
    mm,
    state_tile,
    token_tile,
    token_vector,
)

CHUNK = 64
SUB = 16  # rows of the diagonal blocks of T inverted by substitution


def _state_configs():
    return autotune_configs(
        [triton.Config({"BV": bv}, num_warps=w) for bv in (32, 16, 64) for w in (4, 2, 8)]
    )


def _chunk_configs():
    return autotune_configs(
        [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]
    )


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
    """A float32 matmul at full precision, for the small products that build T."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _kkt_blocks(k, beta, i_h, t0, nt, H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, BKC: tl.constexpr,
                PREC: tl.constexpr):
    """The ten lower [BC, BC] blocks of tril_(diag(beta) K K^T) for a chunk of 4*BC rows."""
    DT = k.dtype.element_ty
    o = tl.arange(0, BC)
    a00 = tl.zeros([BC, BC], dtype=tl.float32)
    a10, a11 = a00, a00
    a20, a21, a22 = a00, a00, a00
    a30, a31, a32, a33 = a00, a00, a00, a00
    p_b0, m_b0 = token_vector(beta + i_h, t0, nt, H, BC)
    p_b1, m_b1 = token_vector(beta + i_h, t0 + BC, nt - BC, H, BC)
    p_b2, m_b2 = token_vector(beta + i_h, t0 + 2 * BC, nt - 2 * BC, H, BC)
    p_b3, m_b3 = token_vector(beta + i_h, t0 + 3 * BC, nt - 3 * BC, H, BC)
    b0 = tl.load(p_b0, mask=m_b0, other=0.0).to(tl.float32)
    b1 = tl.load(p_b1, mask=m_b1, other=0.0).to(tl.float32)
    b2 = tl.load(p_b2, mask=m_b2, other=0.0).to(tl.float32)
    b3 = tl.load(p_b3, mask=m_b3, other=0.0).to(tl.float32)
    for k0 in range(0, K, BKC):
        p_0, m_0 = token_tile(k + i_h * K, t0, nt, H * K, k0, K, BC, BKC)
        p_1, m_1 = token_tile(k + i_h * K, t0 + BC, nt - BC, H * K, k0, K, BC, BKC)
        p_2, m_2 = token_tile(k + i_h * K, t0 + 2 * BC, nt - 2 * BC, H * K, k0, K, BC, BKC)
        p_3, m_3 = token_tile(k + i_h * K, t0 + 3 * BC, nt - 3 * BC, H * K, k0, K, BC, BKC)
        k_0 = tl.load(p_0, mask=m_0, other=0.0)
        k_1 = tl.load(p_1, mask=m_1, other=0.0)
        k_2 = tl.load(p_2, mask=m_2, other=0.0)
        k_3 = tl.load(p_3, mask=m_3, other=0.0)
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
    strict = o[:, None] > o[None, :]
    a00 = tl.where(strict, a00 * b0[:, None], 0.0)
    a11 = tl.where(strict, a11 * b1[:, None], 0.0)
    a22 = tl.where(strict, a22 * b2[:, None], 0.0)
    a33 = tl.where(strict, a33 * b3[:, None], 0.0)
    return (a00, a10 * b1[:, None], a11, a20 * b2[:, None], a21 * b2[:, None], a22,
            a30 * b3[:, None], a31 * b3[:, None], a32 * b3[:, None], a33)


@triton.jit
def _store_block(t_inv, x, i_h, t0, nt, r: tl.constexpr, c: tl.constexpr, H: tl.constexpr, BT: tl.constexpr,
                 BC: tl.constexpr):
    """Store the [BC, BC] block (r, c) of a chunk's T into t_inv [L, H, BT]."""
    p, m = token_tile(t_inv + i_h * BT, t0 + r * BC, nt - r * BC, H * BT, c * BC, BT, BC, BC)
    tl.store(p, x, mask=m)


@triton.jit
def _load_t(t_inv, i_h, t0, nt, H: tl.constexpr, BT: tl.constexpr):
    """A chunk's T as a [BT, BT] tile; only its lower triangle is stored, the rest reads zero."""
    p_t, m_t = token_tile(t_inv + i_h * BT, t0, nt, H * BT, 0, BT, BT, BT)
    o_t = tl.arange(0, BT)
    return tl.load(p_t, mask=m_t & (o_t[:, None] >= o_t[None, :]), other=0.0)


@triton.autotune(configs=_chunk_configs(), key=["K", "V"])
@triton.jit
def delta_rule_wy_fwd_kernel(
    k, v, beta, w, u, t_inv, chunk_index, cu_seqlens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, INVERT: tl.constexpr,
):
    """Per chunk: T = (I + tril_(diag(beta) K K^T))^-1 (only when INVERT; else T is read
    from t_inv), then W = T diag(beta) K and U = T diag(beta) V."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    DT = k.dtype.element_ty
    BC: tl.constexpr = BT // 4
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    if INVERT:
        a00, a10, a11, a20, a21, a22, a30, a31, a32, a33 = _kkt_blocks(k, beta, i_h, t0, nt, H, K, BC, BKC, PREC)
        t00 = _unit_lower_inverse(a00, BC)
        t11 = _unit_lower_inverse(a11, BC)
        t22 = _unit_lower_inverse(a22, BC)
        t33 = _unit_lower_inverse(a33, BC)
        # Below the diagonal: T_ij = -T_ii sum_{j <= m < i} A_im T_mj.
        t10 = -_mm32(t11, _mm32(a10, t00))
        t21 = -_mm32(t22, _mm32(a21, t11))
        t32 = -_mm32(t33, _mm32(a32, t22))
        t20 = -_mm32(t22, _mm32(a20, t00) + _mm32(a21, t10))
        t31 = -_mm32(t33, _mm32(a31, t11) + _mm32(a32, t21))
        t30 = -_mm32(t33, _mm32(a30, t00) + _mm32(a31, t10) + _mm32(a32, t20))
        _store_block(t_inv, t00, i_h, t0, nt, 0, 0, H, BT, BC)
        _store_block(t_inv, t10, i_h, t0, nt, 1, 0, H, BT, BC)
        _store_block(t_inv, t11, i_h, t0, nt, 1, 1, H, BT, BC)
        _store_block(t_inv, t20, i_h, t0, nt, 2, 0, H, BT, BC)
        _store_block(t_inv, t21, i_h, t0, nt, 2, 1, H, BT, BC)
        _store_block(t_inv, t22, i_h, t0, nt, 2, 2, H, BT, BC)
        _store_block(t_inv, t30, i_h, t0, nt, 3, 0, H, BT, BC)
        _store_block(t_inv, t31, i_h, t0, nt, 3, 1, H, BT, BC)
        _store_block(t_inv, t32, i_h, t0, nt, 3, 2, H, BT, BC)
        _store_block(t_inv, t33, i_h, t0, nt, 3, 3, H, BT, BC)
        # The whole chunk's T is read back as one tile so W and U are full-height matmuls.
        tl.debug_barrier()
    b_t = _load_t(t_inv, i_h, t0, nt, H, BT)
    p_b, m_b = token_vector(beta + i_h, t0, nt, H, BT)
    b_beta = tl.load(p_b, mask=m_b, other=0.0).to(tl.float32)
    for k0 in range(0, K, BKC):
        p_k, m_k = token_tile(k + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        b_kb = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32) * b_beta[:, None]
        p_w, m_w = token_tile(w + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        tl.store(p_w, mm(b_t, b_kb, DT, PREC).to(DT), mask=m_w)
    for v0 in range(0, V, BV):
        p_v, m_v = token_tile(v + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_vb = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32) * b_beta[:, None]
        p_u, m_u = token_tile(u + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        tl.store(p_u, mm(b_t, b_vb, DT, PREC).to(DT), mask=m_u)


@triton.autotune(configs=_state_configs(), key=["K", "V"])
@triton.jit
def delta_rule_state_fwd_kernel(
    k, w, u, v_new, h, h0, ht, chunk_offsets, cu_seqlens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    """Sequential over the chunks of one sequence: h[c] = S entering chunk c, V' = U - W S, S += K^T V'."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    DT = k.dtype.element_ty
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    v0 = i_v * BV
    p_s, m_s = state_tile(i_nh.to(tl.int64) * K * V, 0, K, v0, V, BK, BV)
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_s += tl.load(h0 + p_s, mask=m_s, other=0.0)
    for i_t in range(tl.cdiv(eos - bos, BT)):
        t0 = bos + i_t * BT
        nt = tl.minimum(eos - t0, BT)
        p_h, m_h = state_tile(h + ((c0 + i_t) * H + i_h) * K * V, 0, K, v0, V, BK, BV)
        tl.store(p_h, b_s.to(h.dtype.element_ty), mask=m_h)
        p_w, m_w = token_tile(w + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        p_u, m_u = token_tile(u + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_v = tl.load(p_u, mask=m_u, other=0.0).to(tl.float32) - mm(tl.load(p_w, mask=m_w, other=0.0), b_s, DT, PREC)
        p_vn, m_vn = token_tile(v_new + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        tl.store(p_vn, b_v.to(DT), mask=m_vn)
        p_k, m_k = token_tile(k + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        b_s += mm(tl.trans(tl.load(p_k, mask=m_k, other=0.0)), b_v, DT, PREC)
    if STORE_HT:
        tl.store(ht + p_s, b_s, mask=m_s)


@triton.autotune(configs=_chunk_configs(), key=["K", "V"])
@triton.jit
def delta_rule_output_fwd_kernel(
    q, k, v_new, h, o, chunk_index, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk and block of value channels: O = scale (Q S + tril(Q K^T) V')."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DT = q.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    v0 = i_v * BV
    s_base = (i_c.to(tl.int64) * H + i_h) * K * V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in range(0, K, BKC):
        p_q, m_q = token_tile(q + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        p_k, m_k = token_tile(k + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        p_h, m_h = state_tile(h + s_base, k0, K, v0, V, BKC, BV)
        b_q = tl.load(p_q, mask=m_q, other=0.0)
        b_o += mm(b_q, tl.load(p_h, mask=m_h, other=0.0), DT, PREC)
        b_a += mm(b_q, tl.trans(tl.load(p_k, mask=m_k, other=0.0)), DT, PREC)
    o_t = tl.arange(0, BT)
    b_a = tl.where(o_t[:, None] >= o_t[None, :], b_a, 0.0)
    p_v, m_v = token_tile(v_new + i_h * V, t0, nt, H * V, v0, V, BT, BV)
    b_o = (b_o + mm(b_a, tl.load(p_v, mask=m_v, other=0.0), DT, PREC)) * scale
    p_o, m_o = token_tile(o + i_h * V, t0, nt, H * V, v0, V, BT, BV)
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_o)


@triton.autotune(configs=_chunk_configs(), key=["K", "V"])
@triton.jit
def delta_rule_dv_local_kernel(
    q, k, do, dv, chunk_index, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk: the intra-chunk part of dV', scale tril(Q K^T)^T dO."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DT = q.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    v0 = i_v * BV
    # (K Q^T)_ji = (Q K^T)_ij, kept where i >= j.
    b_at = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in range(0, K, BKC):
        p_q, m_q = token_tile(q + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        p_k, m_k = token_tile(k + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        b_at += mm(tl.load(p_k, mask=m_k, other=0.0), tl.trans(tl.load(p_q, mask=m_q, other=0.0)), DT, PREC)
    o_t = tl.arange(0, BT)
    b_at = tl.where(o_t[:, None] <= o_t[None, :], b_at, 0.0) * scale
    p_do, m_do = token_tile(do + i_h * V, t0, nt, H * V, v0, V, BT, BV)
    b_dv = mm(b_at, tl.load(p_do, mask=m_do, other=0.0), DT, PREC)
    p_dv, m_dv = token_tile(dv + i_h * V, t0, nt, H * V, v0, V, BT, BV)
    tl.store(p_dv, b_dv, mask=m_dv)


@triton.autotune(configs=_state_configs(), key=["K", "V"])
@triton.jit
def delta_rule_state_bwd_kernel(
    q, k, w, do, dv_local, du, dh, dht, dh0, chunk_offsets, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    """Reverse over the chunks of one sequence.

    With dS the gradient of the state leaving chunk c: dh[c] = dS,
    dU = dV' = dV'_local + K dS, then dS <- dS + scale Q^T dO - W^T dV'.
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    DT = q.dtype.element_ty
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    v0 = i_v * BV
    p_s, m_s = state_tile(i_nh.to(tl.int64) * K * V, 0, K, v0, V, BK, BV)
    b_ds = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_ds += tl.load(dht + p_s, mask=m_s, other=0.0)
    NT = tl.cdiv(eos - bos, BT)
    for j in range(NT):
        i_t = NT - 1 - j
        t0 = bos + i_t * BT
        nt = tl.minimum(eos - t0, BT)
        p_dh, m_dh = state_tile(dh + ((c0 + i_t) * H + i_h) * K * V, 0, K, v0, V, BK, BV)
        tl.store(p_dh, b_ds.to(dh.dtype.element_ty), mask=m_dh)
        p_k, m_k = token_tile(k + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        p_dvl, m_v = token_tile(dv_local + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_du = tl.load(p_dvl, mask=m_v, other=0.0) + mm(tl.load(p_k, mask=m_k, other=0.0), b_ds, DT, PREC)
        p_du, m_du = token_tile(du + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        tl.store(p_du, b_du, mask=m_du)
        p_q, m_q = token_tile(q + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        p_w, m_w = token_tile(w + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        p_do, m_do = token_tile(do + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_qt = tl.trans(tl.load(p_q, mask=m_q, other=0.0))
        b_wt = tl.trans(tl.load(p_w, mask=m_w, other=0.0))
        b_ds += mm(b_qt, tl.load(p_do, mask=m_do, other=0.0), DT, PREC) * scale - mm(b_wt, b_du, DT, PREC)
    if STORE_DH0:
        tl.store(dh0 + p_s, b_ds, mask=m_s)


@triton.autotune(configs=_chunk_configs(), key=["K", "V"])
@triton.jit
def delta_rule_dqkw_kernel(
    q, k, v_new, h, dh, do, du, dq, dk, dw, chunk_index, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk and slice of the key dim, with S = h[c], dS = dh[c] and dP = tril(scale dO V'^T):
    dQ = scale dO S^T + dP K, dK = dP^T Q + V' dS^T (the W path comes later), dW = -dU S^T."""
    i_kc, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DT = q.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    k0 = i_kc * BKC
    b_dq = tl.zeros([BT, BKC], dtype=tl.float32)
    b_dk = tl.zeros([BT, BKC], dtype=tl.float32)
    b_dw = tl.zeros([BT, BKC], dtype=tl.float32)
    b_dp = tl.zeros([BT, BT], dtype=tl.float32)
    s_base = (i_c.to(tl.int64) * H + i_h) * K * V
    for v0 in range(0, V, BV):
        p_h, m_h = state_tile(h + s_base, k0, K, v0, V, BKC, BV)
        p_dh, m_dh = state_tile(dh + s_base, k0, K, v0, V, BKC, BV)
        b_ht = tl.trans(tl.load(p_h, mask=m_h, other=0.0))
        b_dht = tl.trans(tl.load(p_dh, mask=m_dh, other=0.0))
        p_vn, m_v = token_tile(v_new + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        p_do, m_do = token_tile(do + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        p_du, m_du = token_tile(du + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_vn = tl.load(p_vn, mask=m_v, other=0.0)
        b_do = tl.load(p_do, mask=m_do, other=0.0)
        b_dq += mm(b_do, b_ht, DT, PREC)
        b_dp += mm(b_do, tl.trans(b_vn), DT, PREC)
        b_dk += mm(b_vn, b_dht, DT, PREC)
        b_dw -= mm(tl.load(p_du, mask=m_du, other=0.0), b_ht, DT, PREC)
    o_t = tl.arange(0, BT)
    b_dp = tl.where(o_t[:, None] >= o_t[None, :], b_dp, 0.0) * scale
    p_q, m_q = token_tile(q + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
    p_k, m_k = token_tile(k + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
    b_dq = b_dq * scale + mm(b_dp, tl.load(p_k, mask=m_k, other=0.0), DT, PREC)
    b_dk += mm(tl.trans(b_dp), tl.load(p_q, mask=m_q, other=0.0), DT, PREC)
    p_dq, m_dq = token_tile(dq + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
    p_dk, m_dk = token_tile(dk + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
    p_dw, m_dw = token_tile(dw + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
    tl.store(p_dq, b_dq, mask=m_dq)
    tl.store(p_dk, b_dk, mask=m_dk)
    tl.store(p_dw, b_dw, mask=m_dw)


@triton.autotune(configs=_chunk_configs(), key=["K", "V"])
@triton.jit
def delta_rule_wy_bwd_kernel(
    k, v, beta, t_inv, dw, du, dk_other, dk, dv, dbeta, chunk_index, cu_seqlens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk, from dW and dU back to K, V and beta through W = T diag(beta) K,
    U = T diag(beta) V and T = (I + A)^-1 (dA = -T^T dT T^T), A = tril_(diag(beta) K K^T).
    dk_other is the key gradient of the other paths; dk gets the total."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    DT = k.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    b_t = _load_t(t_inv, i_h, t0, nt, H, BT)
    p_b, m_b = token_vector(beta + i_h, t0, nt, H, BT)
    b_beta = tl.load(p_b, mask=m_b, other=0.0).to(tl.float32)
    b_dt = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for v0 in range(0, V, BV):
        p_v, m_v = token_tile(v + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        p_du, m_du = token_tile(du + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)
        b_du = tl.load(p_du, mask=m_du, other=0.0)
        b_dt += mm(b_du, tl.trans(b_v * b_beta[:, None]), DT, PREC)
        b_dvb = mm(tl.trans(b_t), b_du, DT, PREC)
        b_dbeta += tl.sum(b_dvb * b_v, 1)
        p_dv, m_dv = token_tile(dv + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        tl.store(p_dv, b_dvb * b_beta[:, None], mask=m_dv)
    # First pass over the key dim: dT and beta's share through W, and K K^T for the A path.
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in range(0, K, BKC):
        p_k, m_k = token_tile(k + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        p_dw, m_dw = token_tile(dw + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
        b_dw = tl.load(p_dw, mask=m_dw, other=0.0)
        b_dt += mm(b_dw, tl.trans(b_k * b_beta[:, None]), DT, PREC)
        b_dbeta += tl.sum(mm(tl.trans(b_t), b_dw, DT, PREC) * b_k, 1)
        b_kk += mm(b_k, tl.trans(b_k), DT, PREC)
    o_t = tl.arange(0, BT)
    b_da = -mm(mm(tl.trans(b_t), b_dt, DT, PREC), tl.trans(b_t), DT, PREC)
    b_da = tl.where(o_t[:, None] > o_t[None, :], b_da, 0.0)
    b_dbeta += tl.sum(b_da * b_kk, 1)
    p_db, m_db = token_vector(dbeta + i_h, t0, nt, H, BT)
    tl.store(p_db, b_dbeta, mask=m_db)
    # Second pass: dK = dK_other + diag(beta) T^T dW + diag(beta) dA K + dA^T diag(beta) K.
    b_dab = b_da * b_beta[:, None]
    for k0 in range(0, K, BKC):
        p_k, m_k = token_tile(k + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        p_dw, m_dw = token_tile(dw + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        p_dko, m_dko = token_tile(dk_other + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        p_dk, m_dk = token_tile(dk + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
        b_dk = tl.load(p_dko, mask=m_dko, other=0.0)
        b_dk += mm(tl.trans(b_t), tl.load(p_dw, mask=m_dw, other=0.0), DT, PREC) * b_beta[:, None]
        b_dk += mm(b_dab, b_k, DT, PREC) + mm(tl.trans(b_da), b_k * b_beta[:, None], DT, PREC)
        tl.store(p_dk, b_dk, mask=m_dk)


@triton.autotune(configs=_state_configs(), key=["K", "V"])
@triton.jit
def delta_rule_recurrent_fwd_kernel(
    q, k, v, beta, o, h0, ht, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    """One token at a time, the state in registers: for decoding and short prefills."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    p_s, m_s = state_tile(i_nh.to(tl.int64) * K * V, 0, K, i_v * BV, V, BK, BV)
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_s += tl.load(h0 + p_s, mask=m_s, other=0.0)
    for t in range(bos, eos):
        b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + t * H + i_h).to(tl.float32)
        b_vn = b_v - tl.sum(b_s * b_k[:, None], 0)
        b_s += (b_k * b_beta)[:, None] * b_vn[None, :]
        b_o = tl.sum(b_s * b_q[:, None], 0) * scale
        tl.store(o + (t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + p_s, b_s, mask=m_s)


KERNELS = (
    delta_rule_wy_fwd_kernel,
    delta_rule_state_fwd_kernel,
    delta_rule_output_fwd_kernel,
    delta_rule_dv_local_kernel,
    delta_rule_state_bwd_kernel,
    delta_rule_dqkw_kernel,
    delta_rule_wy_bwd_kernel,
    delta_rule_recurrent_fwd_kernel,
)


def block_sizes(K: int, V: int) -> dict[str, int]:
    """BK covers the key dim (state tiles), BKC is the key slice of per-chunk kernels,
    BV the value block of per-chunk kernels (the sequential kernels autotune theirs)."""
    if K > 256 or V > 256:
        raise ValueError(f"the Triton delta rule supports head dims up to 256, got K={K}, V={V}")
    BK = head_block(K)
    return {"BK": BK, "BKC": min(64, BK), "BV": min(64, head_block(V))}


def _wy(k, v, beta, t_inv, chunking: Chunking, invert: bool, sizes, prec):
    """Kernel 1: W and U per chunk; T is inverted into t_inv when ``invert``, else read from it."""
    L, H, K = k.shape
    V = v.shape[-1]
    w = empty(L, H, K, dtype=k.dtype, device=k.device)
    u = empty(L, H, V, dtype=k.dtype, device=k.device)
    delta_rule_wy_fwd_kernel[(chunking.num_chunks, H)](
        k, v, beta, w, u, t_inv, chunking.chunk_index, chunking.cu_seqlens,
        H=H, K=K, V=V, BT=CHUNK, BKC=sizes["BKC"], BV=sizes["BV"], PREC=prec, INVERT=invert,
    )
    return w, u


def _states(k, w, u, h0, chunking: Chunking, store_final: bool, sizes, prec):
    """Kernel 2: the state entering each chunk, V', and the final state."""
    L, H, K = k.shape
    V = u.shape[-1]
    N = chunking.num_sequences
    h = empty(chunking.num_chunks, H, K, V, dtype=k.dtype, device=k.device)
    v_new = empty(L, H, V, dtype=k.dtype, device=k.device)
    ht = empty(N, H, K, V, dtype=torch.float32, device=k.device) if store_final else None
    delta_rule_state_fwd_kernel[lambda meta: (triton.cdiv(V, meta["BV"]), N * H)](
        k, w, u, v_new, h, h0, ht, chunking.chunk_offsets, chunking.cu_seqlens,
        H=H, K=K, V=V, BT=CHUNK, BK=sizes["BK"], PREC=prec, HAS_H0=h0 is not None, STORE_HT=store_final,
    )
    return h, v_new, ht


def chunk_delta_rule_fwd(q, k, v, beta, scale, h0, chunking: Chunking, store_final: bool):
    """Chunked forward. Returns (o [L, H, V], final state [N, H, K, V] float32 or None,
    t_inv [L, H, 64] float32 for the backward)."""
    L, H, K = q.shape
    V = v.shape[-1]
    sizes, prec = block_sizes(K, V), dot_precision(q.dtype)
    t_inv = empty(L, H, CHUNK, dtype=torch.float32, device=q.device)
    w, u = _wy(k, v, beta, t_inv, chunking, True, sizes, prec)
    h, v_new, ht = _states(k, w, u, h0, chunking, store_final, sizes, prec)
    o = empty(L, H, V, dtype=q.dtype, device=q.device)
    delta_rule_output_fwd_kernel[(triton.cdiv(V, sizes["BV"]), chunking.num_chunks, H)](
        q, k, v_new, h, o, chunking.chunk_index, chunking.cu_seqlens, scale,
        H=H, K=K, V=V, BT=CHUNK, BKC=sizes["BKC"], BV=sizes["BV"], PREC=prec,
    )
    return o, ht, t_inv


def chunk_delta_rule_bwd(q, k, v, beta, t_inv, scale, h0, chunking: Chunking, do, dht, need_dh0: bool):
    """Chunked backward. Returns (dq, dk, dv, dbeta, dh0 or None), the first four float32."""
    L, H, K = q.shape
    V = v.shape[-1]
    sizes, prec = block_sizes(K, V), dot_precision(q.dtype)
    BKC, BV = sizes["BKC"], sizes["BV"]
    N, NC = chunking.num_sequences, chunking.num_chunks
    idx, cu = chunking.chunk_index, chunking.cu_seqlens
    dev = q.device
    w, u = _wy(k, v, beta, t_inv, chunking, False, sizes, prec)
    h, v_new, _ = _states(k, w, u, h0, chunking, False, sizes, prec)
    dv_local = empty(L, H, V, dtype=torch.float32, device=dev)
    delta_rule_dv_local_kernel[(triton.cdiv(V, BV), NC, H)](
        q, k, do, dv_local, idx, cu, scale, H=H, K=K, V=V, BT=CHUNK, BKC=BKC, BV=BV, PREC=prec,
    )
    dh = empty(NC, H, K, V, dtype=q.dtype, device=dev)
    du = empty(L, H, V, dtype=torch.float32, device=dev)
    dh0 = empty(N, H, K, V, dtype=torch.float32, device=dev) if need_dh0 else None
    delta_rule_state_bwd_kernel[lambda meta: (triton.cdiv(V, meta["BV"]), N * H)](
        q, k, w, do, dv_local, du, dh, dht, dh0, chunking.chunk_offsets, cu, scale,
        H=H, K=K, V=V, BT=CHUNK, BK=sizes["BK"], PREC=prec, HAS_DHT=dht is not None, STORE_DH0=need_dh0,
    )
    dq = empty(L, H, K, dtype=torch.float32, device=dev)
    dk_other = empty(L, H, K, dtype=torch.float32, device=dev)
    dw = empty(L, H, K, dtype=torch.float32, device=dev)
    delta_rule_dqkw_kernel[(triton.cdiv(K, BKC), NC, H)](
        q, k, v_new, h, dh, do, du, dq, dk_other, dw, idx, cu, scale,
        H=H, K=K, V=V, BT=CHUNK, BKC=BKC, BV=BV, PREC=prec,
    )
    dk = empty(L, H, K, dtype=torch.float32, device=dev)
    dv = empty(L, H, V, dtype=torch.float32, device=dev)
    dbeta = empty(L, H, dtype=torch.float32, device=dev)
    delta_rule_wy_bwd_kernel[(NC, H)](
        k, v, beta, t_inv, dw, du, dk_other, dk, dv, dbeta, idx, cu,
        H=H, K=K, V=V, BT=CHUNK, BKC=BKC, BV=BV, PREC=prec,
    )
    return dq, dk, dv, dbeta, dh0


def recurrent_delta_rule_fwd(q, k, v, beta, scale, h0, cu_seqlens: torch.Tensor, store_final: bool):
    """Token-by-token forward (no backward): decoding and short prefills. Returns (o, final state or None)."""
    L, H, K = q.shape
    V = v.shape[-1]
    sizes = block_sizes(K, V)
    N = cu_seqlens.numel() - 1
    o = empty(L, H, V, dtype=q.dtype, device=q.device)
    ht = empty(N, H, K, V, dtype=torch.float32, device=q.device) if store_final else None
    delta_rule_recurrent_fwd_kernel[lambda meta: (triton.cdiv(V, meta["BV"]), N * H)](
        q, k, v, beta, o, h0, ht, cu_seqlens, scale,
        H=H, K=K, V=V, BK=sizes["BK"], HAS_H0=h0 is not None, STORE_HT=store_final,
    )
    return o, ht
