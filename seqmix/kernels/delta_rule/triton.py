"""Fused Triton kernels of the delta rule: chunked WY/UT form (forward, backward) and a recurrent decoder.

Inputs arrive packed: q, k ``[L, H, K]``, v ``[L, H, V]``, beta ``[L, H]`` with
``L`` the total number of tokens and sequence boundaries in a
:class:`~seqmix.kernels.sequences.Chunking`. The chunked forward runs three
kernels (``../shared/MATH.md`` gives the algebra):

1. ``wy_fwd``: per chunk, ``A = tril_(diag(beta) K K^T)``, ``T = (I + A)^-1`` by
   forward substitution, ``W = T diag(beta) K``, ``U = T diag(beta) V``.
2. ``state_fwd``: per sequence and block of value channels, the only
   sequential pass: stores the state entering each chunk, ``V' = U - W S``,
   and ``S += K^T V'``.
3. ``output_fwd``: per chunk, ``O = scale (Q S + tril(Q K^T) V')``.

The backward recomputes 1-2 (the per-chunk states cost more memory than
the recomputation costs time) and runs four more: the intra-chunk part of
``dV'``, the reverse state pass (the state gradient entering each chunk and
the full ``dV'``), ``dQ``/``dK``/``dW`` per chunk, and the WY backward that
turns ``dW``, ``dU`` into ``dK``, ``dV``, ``dbeta``.
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


def _state_configs():
    return autotune_configs(
        [triton.Config({"BV": bv}, num_warps=w) for bv in (32, 16, 64) for w in (4, 2, 8)]
    )


@triton.jit
def delta_rule_wy_fwd_kernel(
    k, v, beta, w, u, t_inv, chunk_index, cu_seqlens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk: T = (I + tril_(diag(beta) K K^T))^-1, W = T diag(beta) K, U = T diag(beta) V."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    DT = k.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    p_k, m_k = token_tile(k + i_h * K, t0, nt, H * K, 0, K, BT, BK)
    p_b, m_b = token_vector(beta + i_h, t0, nt, H, BT)
    b_k = tl.load(p_k, mask=m_k, other=0.0)
    b_beta = tl.load(p_b, mask=m_b, other=0.0).to(tl.float32)
    b_kb = b_k.to(tl.float32) * b_beta[:, None]
    o_t = tl.arange(0, BT)
    b_a = tl.where(o_t[:, None] > o_t[None, :], mm(b_kb, tl.trans(b_k), DT, PREC), 0.0)
    # Row i of T is e_i - sum_{j<i} A_ij T_j: rows of T are filled top to bottom.
    b_t = tl.zeros([BT, BT], dtype=tl.float32)
    for i in range(BT):
        a_i = tl.sum(tl.where(o_t[:, None] == i, b_a, 0.0), 0)
        t_i = (o_t == i).to(tl.float32) - tl.sum(a_i[:, None] * b_t, 0)
        b_t = tl.where(o_t[:, None] == i, t_i[None, :], b_t)
    p_t, m_t = token_tile(t_inv + i_h * BT, t0, nt, H * BT, 0, BT, BT, BT)
    tl.store(p_t, b_t, mask=m_t)
    p_w, _ = token_tile(w + i_h * K, t0, nt, H * K, 0, K, BT, BK)
    tl.store(p_w, mm(b_t, b_kb, DT, PREC).to(DT), mask=m_k)
    for v0 in range(0, V, BV):
        p_v, m_v = token_tile(v + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_vb = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32) * b_beta[:, None]
        p_u, _ = token_tile(u + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        tl.store(p_u, mm(b_t, b_vb, DT, PREC).to(DT), mask=m_v)


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
        p_h, _ = state_tile(h + ((c0 + i_t) * H + i_h) * K * V, 0, K, v0, V, BK, BV)
        tl.store(p_h, b_s.to(h.dtype.element_ty), mask=m_s)
        p_w, m_w = token_tile(w + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        p_u, m_u = token_tile(u + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_v = tl.load(p_u, mask=m_u, other=0.0).to(tl.float32) - mm(tl.load(p_w, mask=m_w, other=0.0), b_s, DT, PREC)
        p_vn, _ = token_tile(v_new + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        tl.store(p_vn, b_v.to(DT), mask=m_u)
        p_k, _ = token_tile(k + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        b_s += mm(tl.trans(tl.load(p_k, mask=m_w, other=0.0)), b_v, DT, PREC)
    if STORE_HT:
        tl.store(ht + p_s, b_s, mask=m_s)


@triton.jit
def delta_rule_output_fwd_kernel(
    q, k, v_new, h, o, chunk_index, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk and block of value channels: O = scale (Q S + tril(Q K^T) V')."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DT = q.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    v0 = i_v * BV
    p_q, m_q = token_tile(q + i_h * K, t0, nt, H * K, 0, K, BT, BK)
    p_k, _ = token_tile(k + i_h * K, t0, nt, H * K, 0, K, BT, BK)
    b_q = tl.load(p_q, mask=m_q, other=0.0)
    b_k = tl.load(p_k, mask=m_q, other=0.0)
    p_h, m_h = state_tile(h + (i_c.to(tl.int64) * H + i_h) * K * V, 0, K, v0, V, BK, BV)
    b_h = tl.load(p_h, mask=m_h, other=0.0)
    p_v, m_v = token_tile(v_new + i_h * V, t0, nt, H * V, v0, V, BT, BV)
    b_v = tl.load(p_v, mask=m_v, other=0.0)
    o_t = tl.arange(0, BT)
    b_a = tl.where(o_t[:, None] >= o_t[None, :], mm(b_q, tl.trans(b_k), DT, PREC), 0.0)
    b_o = (mm(b_q, b_h, DT, PREC) + mm(b_a, b_v, DT, PREC)) * scale
    p_o, _ = token_tile(o + i_h * V, t0, nt, H * V, v0, V, BT, BV)
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_v)


@triton.jit
def delta_rule_dv_local_kernel(
    q, k, do, dv, chunk_index, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk: the intra-chunk part of dV', scale tril(Q K^T)^T dO."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DT = q.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    v0 = i_v * BV
    p_q, m_q = token_tile(q + i_h * K, t0, nt, H * K, 0, K, BT, BK)
    p_k, _ = token_tile(k + i_h * K, t0, nt, H * K, 0, K, BT, BK)
    o_t = tl.arange(0, BT)
    # (K Q^T)_ji = (Q K^T)_ij, kept where i >= j.
    b_at = mm(tl.load(p_k, mask=m_q, other=0.0), tl.trans(tl.load(p_q, mask=m_q, other=0.0)), DT, PREC)
    b_at = tl.where(o_t[:, None] <= o_t[None, :], b_at, 0.0) * scale
    p_do, m_do = token_tile(do + i_h * V, t0, nt, H * V, v0, V, BT, BV)
    b_dv = mm(b_at, tl.load(p_do, mask=m_do, other=0.0), DT, PREC)
    p_dv, _ = token_tile(dv + i_h * V, t0, nt, H * V, v0, V, BT, BV)
    tl.store(p_dv, b_dv, mask=m_do)


@triton.autotune(configs=_state_configs(), key=["K", "V"])
@triton.jit
def delta_rule_state_bwd_kernel(
    q, k, w, do, dv_local, dv, dh, dht, dh0, chunk_offsets, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    """Reverse over the chunks of one sequence.

    With dS the gradient of the state leaving chunk c: dh[c] = dS,
    dV' = dV'_local + K dS, then dS <- dS + scale Q^T dO - W^T dV'.
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
        p_dh, _ = state_tile(dh + ((c0 + i_t) * H + i_h) * K * V, 0, K, v0, V, BK, BV)
        tl.store(p_dh, b_ds.to(dh.dtype.element_ty), mask=m_s)
        p_k, m_k = token_tile(k + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        p_dvl, m_v = token_tile(dv_local + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_dv = tl.load(p_dvl, mask=m_v, other=0.0) + mm(tl.load(p_k, mask=m_k, other=0.0), b_ds, DT, PREC)
        p_dv, _ = token_tile(dv + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        tl.store(p_dv, b_dv, mask=m_v)
        p_q, _ = token_tile(q + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        p_w, _ = token_tile(w + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        p_do, _ = token_tile(do + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_qt = tl.trans(tl.load(p_q, mask=m_k, other=0.0))
        b_wt = tl.trans(tl.load(p_w, mask=m_k, other=0.0))
        b_ds += mm(b_qt, tl.load(p_do, mask=m_v, other=0.0), DT, PREC) * scale - mm(b_wt, b_dv, DT, PREC)
    if STORE_DH0:
        tl.store(dh0 + p_s, b_ds, mask=m_s)


@triton.jit
def delta_rule_dqkw_kernel(
    q, k, v_new, h, dh, do, dv, dq, dk, dw, chunk_index, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk, with S = h[c], dS = dh[c] and P = tril(Q K^T):
    dQ = scale dO S^T + dP K, dK = dP^T Q + V' dS^T (the W path comes later), dW = -dV' S^T,
    where dP = tril(scale dO V'^T)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    DT = q.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dp = tl.zeros([BT, BT], dtype=tl.float32)
    s_base = (i_c.to(tl.int64) * H + i_h) * K * V
    for v0 in range(0, V, BV):
        p_h, m_h = state_tile(h + s_base, 0, K, v0, V, BK, BV)
        p_dh, _ = state_tile(dh + s_base, 0, K, v0, V, BK, BV)
        b_ht = tl.trans(tl.load(p_h, mask=m_h, other=0.0))
        b_dht = tl.trans(tl.load(p_dh, mask=m_h, other=0.0))
        p_vn, m_v = token_tile(v_new + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        p_do, _ = token_tile(do + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        p_dv, _ = token_tile(dv + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_vn = tl.load(p_vn, mask=m_v, other=0.0)
        b_do = tl.load(p_do, mask=m_v, other=0.0)
        b_dv = tl.load(p_dv, mask=m_v, other=0.0)
        b_dq += mm(b_do, b_ht, DT, PREC)
        b_dp += mm(b_do, tl.trans(b_vn), DT, PREC)
        b_dk += mm(b_vn, b_dht, DT, PREC)
        b_dw -= mm(b_dv, b_ht, DT, PREC)
    o_t = tl.arange(0, BT)
    b_dp = tl.where(o_t[:, None] >= o_t[None, :], b_dp, 0.0) * scale
    p_q, m_q = token_tile(q + i_h * K, t0, nt, H * K, 0, K, BT, BK)
    p_k, _ = token_tile(k + i_h * K, t0, nt, H * K, 0, K, BT, BK)
    b_q = tl.load(p_q, mask=m_q, other=0.0)
    b_k = tl.load(p_k, mask=m_q, other=0.0)
    b_dq = b_dq * scale + mm(b_dp, b_k, DT, PREC)
    b_dk += mm(tl.trans(b_dp), b_q, DT, PREC)
    p_dq, _ = token_tile(dq + i_h * K, t0, nt, H * K, 0, K, BT, BK)
    p_dk, _ = token_tile(dk + i_h * K, t0, nt, H * K, 0, K, BT, BK)
    p_dw, _ = token_tile(dw + i_h * K, t0, nt, H * K, 0, K, BT, BK)
    tl.store(p_dq, b_dq, mask=m_q)
    tl.store(p_dk, b_dk, mask=m_q)
    tl.store(p_dw, b_dw, mask=m_q)


@triton.jit
def delta_rule_wy_bwd_kernel(
    k, v, beta, t_inv, dw, du, dk, dv, dbeta, chunk_index, cu_seqlens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk, from dW and dU (= dV') back to K, V and beta through W = T diag(beta) K,
    U = T diag(beta) V and T = (I + A)^-1 (dA = -T^T dT T^T). Adds into dk, which holds
    the gradient of the other paths."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    DT = k.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    p_t, m_t = token_tile(t_inv + i_h * BT, t0, nt, H * BT, 0, BT, BT, BT)
    b_t = tl.load(p_t, mask=m_t, other=0.0)
    p_b, m_b = token_vector(beta + i_h, t0, nt, H, BT)
    b_beta = tl.load(p_b, mask=m_b, other=0.0).to(tl.float32)
    b_dt = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for v0 in range(0, V, BV):
        p_v, m_v = token_tile(v + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        p_du, _ = token_tile(du + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)
        b_du = tl.load(p_du, mask=m_v, other=0.0)
        b_dt += mm(b_du, tl.trans(b_v * b_beta[:, None]), DT, PREC)
        b_dvb = mm(tl.trans(b_t), b_du, DT, PREC)
        b_dbeta += tl.sum(b_dvb * b_v, 1)
        p_dv, _ = token_tile(dv + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        tl.store(p_dv, b_dvb * b_beta[:, None], mask=m_v)
    p_k, m_k = token_tile(k + i_h * K, t0, nt, H * K, 0, K, BT, BK)
    p_dw, _ = token_tile(dw + i_h * K, t0, nt, H * K, 0, K, BT, BK)
    p_dk, _ = token_tile(dk + i_h * K, t0, nt, H * K, 0, K, BT, BK)
    b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
    b_kb = b_k * b_beta[:, None]
    b_dw = tl.load(p_dw, mask=m_k, other=0.0)
    b_dt += mm(b_dw, tl.trans(b_kb), DT, PREC)
    b_dkb = mm(tl.trans(b_t), b_dw, DT, PREC)
    b_dbeta += tl.sum(b_dkb * b_k, 1)
    b_dk = tl.load(p_dk, mask=m_k, other=0.0) + b_dkb * b_beta[:, None]
    o_t = tl.arange(0, BT)
    b_da = -mm(mm(tl.trans(b_t), b_dt, DT, PREC), tl.trans(b_t), DT, PREC)
    b_da = tl.where(o_t[:, None] > o_t[None, :], b_da, 0.0)
    b_dbeta += tl.sum(b_da * mm(b_k, tl.trans(b_k), DT, PREC), 1)
    b_dk += mm(b_da * b_beta[:, None], b_k, DT, PREC) + mm(tl.trans(b_da), b_kb, DT, PREC)
    tl.store(p_dk, b_dk, mask=m_k)
    p_db, _ = token_vector(dbeta + i_h, t0, nt, H, BT)
    tl.store(p_db, b_dbeta, mask=m_b)


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


def _blocks(q: torch.Tensor, v: torch.Tensor):
    K, V = q.shape[-1], v.shape[-1]
    if K > 256 or V > 256:
        raise ValueError(f"the Triton delta rule supports head dims up to 256, got K={K}, V={V}")
    return K, V, head_block(K), min(64, head_block(V)), dot_precision(q.dtype)


def _forward_states(k, v, beta, h0, chunking: Chunking, store_final: bool):
    """Kernels 1-2: W, U, T^-1 per chunk, the state entering each chunk, V' and the final state."""
    L, H, _ = k.shape
    K, V, BK, BV, prec = _blocks(k, v)
    N, NC = chunking.num_sequences, chunking.num_chunks
    dev = k.device
    w = empty(L, H, K, dtype=k.dtype, device=dev)
    u = empty(L, H, V, dtype=k.dtype, device=dev)
    t_inv = empty(L, H, CHUNK, dtype=torch.float32, device=dev)
    delta_rule_wy_fwd_kernel[(NC, H)](
        k, v, beta, w, u, t_inv, chunking.chunk_index, chunking.cu_seqlens,
        H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, PREC=prec,
    )
    h = empty(NC, H, K, V, dtype=k.dtype, device=dev)
    v_new = empty(L, H, V, dtype=k.dtype, device=dev)
    ht = empty(N, H, K, V, dtype=torch.float32, device=dev) if store_final else None
    delta_rule_state_fwd_kernel[lambda meta: (triton.cdiv(V, meta["BV"]), N * H)](
        k, w, u, v_new, h, h0, ht, chunking.chunk_offsets, chunking.cu_seqlens,
        H=H, K=K, V=V, BT=CHUNK, BK=BK, PREC=prec, HAS_H0=h0 is not None, STORE_HT=store_final,
    )
    return w, t_inv, h, v_new, ht


def chunk_delta_rule_fwd(q, k, v, beta, scale, h0, chunking: Chunking, store_final: bool):
    """Chunked forward. Returns (o [L, H, V], final state [N, H, K, V] float32 or None)."""
    L, H, _ = q.shape
    K, V, BK, BV, prec = _blocks(q, v)
    _, _, h, v_new, ht = _forward_states(k, v, beta, h0, chunking, store_final)
    o = empty(L, H, V, dtype=q.dtype, device=q.device)
    delta_rule_output_fwd_kernel[(triton.cdiv(V, BV), chunking.num_chunks, H)](
        q, k, v_new, h, o, chunking.chunk_index, chunking.cu_seqlens, scale,
        H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, PREC=prec,
    )
    return o, ht


def chunk_delta_rule_bwd(q, k, v, beta, scale, h0, chunking: Chunking, do, dht, need_dh0: bool):
    """Chunked backward. Returns (dq, dk, dv, dbeta, dh0 or None), the first four float32."""
    L, H, _ = q.shape
    K, V, BK, BV, prec = _blocks(q, v)
    N, NC = chunking.num_sequences, chunking.num_chunks
    dev = q.device
    w, t_inv, h, v_new, _ = _forward_states(k, v, beta, h0, chunking, False)
    idx, cu = chunking.chunk_index, chunking.cu_seqlens
    dv_local = empty(L, H, V, dtype=torch.float32, device=dev)
    delta_rule_dv_local_kernel[(triton.cdiv(V, BV), NC, H)](
        q, k, do, dv_local, idx, cu, scale, H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, PREC=prec,
    )
    dh = empty(NC, H, K, V, dtype=q.dtype, device=dev)
    du = empty(L, H, V, dtype=torch.float32, device=dev)
    dh0 = empty(N, H, K, V, dtype=torch.float32, device=dev) if need_dh0 else None
    delta_rule_state_bwd_kernel[lambda meta: (triton.cdiv(V, meta["BV"]), N * H)](
        q, k, w, do, dv_local, du, dh, dht, dh0, chunking.chunk_offsets, cu, scale,
        H=H, K=K, V=V, BT=CHUNK, BK=BK, PREC=prec, HAS_DHT=dht is not None, STORE_DH0=need_dh0,
    )
    dq = empty(L, H, K, dtype=torch.float32, device=dev)
    dk = empty(L, H, K, dtype=torch.float32, device=dev)
    dw = empty(L, H, K, dtype=torch.float32, device=dev)
    delta_rule_dqkw_kernel[(NC, H)](
        q, k, v_new, h, dh, do, du, dq, dk, dw, idx, cu, scale,
        H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, PREC=prec,
    )
    dv = empty(L, H, V, dtype=torch.float32, device=dev)
    dbeta = empty(L, H, dtype=torch.float32, device=dev)
    delta_rule_wy_bwd_kernel[(NC, H)](
        k, v, beta, t_inv, dw, du, dk, dv, dbeta, idx, cu,
        H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, PREC=prec,
    )
    return dq, dk, dv, dbeta, dh0


def recurrent_delta_rule_fwd(q, k, v, beta, scale, h0, cu_seqlens: torch.Tensor, store_final: bool):
    """Token-by-token forward (no backward): decoding and short prefills. Returns (o, final state or None)."""
    L, H, _ = q.shape
    K, V, BK, _, _ = _blocks(q, v)
    N = cu_seqlens.numel() - 1
    o = empty(L, H, V, dtype=q.dtype, device=q.device)
    ht = empty(N, H, K, V, dtype=torch.float32, device=q.device) if store_final else None
    delta_rule_recurrent_fwd_kernel[lambda meta: (triton.cdiv(V, meta["BV"]), N * H)](
        q, k, v, beta, o, h0, ht, cu_seqlens, scale,
        H=H, K=K, V=V, BK=BK, HAS_H0=h0 is not None, STORE_HT=store_final,
    )
    return o, ht
