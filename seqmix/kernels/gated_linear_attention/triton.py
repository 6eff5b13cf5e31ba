"""Fused Triton kernels of gated linear attention: chunked forward and backward, recurrent decoder.

Inputs arrive packed: q, k, g ``[L, H, K]``, v ``[L, H, V]``; the kernels read gcum, the in-chunk
cumulative sum of g (float32, from :func:`~seqmix.kernels.triton_common.chunk_local_cumsum`).
With chunks of 64 tokens (docs/math/gla.md):

- ``state_fwd`` (sequential per sequence): h[c] = S entering chunk c,
  ``S <- diag(exp(gcum_C)) S + (K exp(gcum_C - gcum))^T V``.
- ``intra_fwd`` (per chunk): ``A_ij = scale sum_c q_ic k_jc exp(gcum_ic - gcum_jc)``, j <= i, by the
  GLA paper's secondary chunking: sub-chunks of 16 rows; a block below the diagonal is the matmul
  of ``q exp(gcum - gcum_ref)`` and ``k exp(gcum_ref - gcum)`` with gcum_ref a row between the two sub-chunks, so
  both factors are at most 1; diagonal blocks are summed element-wise with ``exp(gcum_i - gcum_j)``,
  i >= j. Nothing forms exp(gcum_i) exp(-gcum_j), which overflows for decays near exp(-20) per token.
- ``output_fwd`` (per chunk): ``O = scale (Q exp(gcum)) S + A V``.

The backward recomputes the states, runs the state gradient in reverse (dh[c] = the gradient of
the state leaving chunk c), then per chunk ``dA = scale tril(dO V^T)``, ``dV = A^T dO +
(K exp(gcum_C - gcum)) dh``, and per sub-chunk of 16 rows dQ, dK and dgcum, the gradient of gcum:
``dgcum = Q dQ - K dK``, plus at the chunk's last row ``rowsum(S_leaving * dh)`` (the path through
gcum_C). g's gradient is the reverse in-chunk cumulative sum of dgcum.
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
    dot_precision,
    exp_rows,
    key_value_blocks,
    load_matrix,
    load_row,
    load_rows,
    mm,
    sequence_bounds,
    sequence_program,
    state_configs,
    store_matrix,
    store_rows,
)
from seqmix.kernels.triton_limits import GLA_CHUNK as CHUNK

SUB = 16


@autotune(configs=state_configs("BV"), key=["K", "V"])
@triton.jit
def gla_state_fwd_kernel(
    k, v, gcum, h, h0, ht, chunk_offsets, cu_seqlens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    """Sequential over the chunks of one sequence: h[c] = S entering chunk c,
    S <- diag(exp(gcum_C)) S + (K exp(gcum_C - gcum))^T V."""
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
        b_g = load_rows(gcum + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        b_last = load_row(gcum + i_h * K, t0 + nt - 1, H * K, 0, K, BK)
        b_k = load_rows(k + i_h * K, t0, nt, H * K, 0, K, BT, BK) * tl.exp(b_last[None, :] - b_g)
        b_v = load_rows(v + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_s = b_s * tl.exp(b_last)[:, None] + mm(tl.trans(b_k), b_v, DT, PREC)
    if STORE_HT:
        store_matrix(ht + s_base, b_s, 0, K, v0, V, BK, BV)


@triton.jit
def _diagonal_scores(q, k, gcum, i_h, t0, nt, r, H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr,
                     BKD: tl.constexpr):
    """Sub-chunk r's diagonal block, sum_c q_ic k_jc exp(gcum_ic - gcum_jc) for j <= i, element-wise as
    [BC, BC, BKD] products over key slices of BKD (the exponent is masked, never split)."""
    o = tl.arange(0, BC)
    tr, nr = t0 + r * BC, nt - r * BC
    keep = (o[:, None] >= o[None, :]) & (o < nr)[:, None]
    acc = tl.zeros([BC, BC], dtype=tl.float32)
    for k0 in range(0, K, BKD):
        b_q = load_rows(q + i_h * K, tr, nr, H * K, k0, K, BC, BKD).to(tl.float32)
        b_k = load_rows(k + i_h * K, tr, nr, H * K, k0, K, BC, BKD).to(tl.float32)
        b_g = load_rows(gcum + i_h * K, tr, nr, H * K, k0, K, BC, BKD)
        expo = tl.where(keep[:, :, None], b_g[:, None, :] - b_g[None, :, :], float("-inf"))
        acc += tl.sum(b_q[:, None, :] * b_k[None, :, :] * tl.exp(expo), 2)
    return acc


@autotune(configs=chunk_configs(), key=["K"])
@triton.jit
def gla_intra_fwd_kernel(
    q, k, gcum, A, chunk_index, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BKC: tl.constexpr,
    PREC: tl.constexpr,
):
    """Per chunk: the lower blocks of A = scale (sum_c q_ic k_jc exp(gcum_ic - gcum_jc)) [BT, BT] in
    sub-chunks of BC rows. Blocks above the diagonal are not written; readers mask them."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    DT = q.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    o = tl.arange(0, BC)
    NB: tl.constexpr = BT // BC
    for r in tl.static_range(NB):
        tr, nr = t0 + r * BC, nt - r * BC
        # The reference point of row block r: its first row (clamped into the sequence).
        ref_row = t0 + tl.minimum(r * BC, nt - 1)
        for s in tl.static_range(r):
            acc = tl.zeros([BC, BC], dtype=tl.float32)
            for k0 in range(0, K, BKC):
                ref = load_row(gcum + i_h * K, ref_row, H * K, k0, K, BKC)
                b_q = load_rows(q + i_h * K, tr, nr, H * K, k0, K, BC, BKC)
                b_gq = load_rows(gcum + i_h * K, tr, nr, H * K, k0, K, BC, BKC)
                b_k = load_rows(k + i_h * K, t0 + s * BC, nt - s * BC, H * K, k0, K, BC, BKC)
                b_gk = load_rows(gcum + i_h * K, t0 + s * BC, nt - s * BC, H * K, k0, K, BC, BKC)
                b_q = b_q * exp_rows(b_gq - ref[None, :], o < nr)
                b_k = b_k * exp_rows(ref[None, :] - b_gk, o < nt - s * BC)
                acc += mm(b_q, tl.trans(b_k), DT, PREC)
            store_rows(A + i_h * BT, acc * scale, tr, nr, H * BT, s * BC, BT, BC, BC)
        acc = _diagonal_scores(q, k, gcum, i_h, t0, nt, r, H, K, BC, BC)
        store_rows(A + i_h * BT, acc * scale, tr, nr, H * BT, r * BC, BT, BC, BC)


@triton.jit
def _load_scores(A, i_h, t0, nt, H: tl.constexpr, BT: tl.constexpr):
    """A chunk's [BT, BT] scores (or their gradient) with the upper triangle zeroed."""
    o_t = tl.arange(0, BT)
    b_a = load_rows(A + i_h * BT, t0, nt, H * BT, 0, BT, BT, BT)
    return tl.where(o_t[:, None] >= o_t[None, :], b_a, 0.0)


@autotune(configs=chunk_configs(), key=["K", "V"])
@triton.jit
def gla_output_fwd_kernel(
    q, v, gcum, h, A, o, chunk_index, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk and block of value channels: O = scale (Q exp(gcum)) S + A V."""
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DT = q.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    v0 = i_v * BV
    s_base = (i_c.to(tl.int64) * H + i_h) * K * V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for k0 in range(0, K, BKC):
        b_q = load_rows(q + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        b_q = b_q * tl.exp(load_rows(gcum + i_h * K, t0, nt, H * K, k0, K, BT, BKC))
        b_o += mm(b_q, load_matrix(h + s_base, k0, K, v0, V, BKC, BV), DT, PREC)
    b_v = load_rows(v + i_h * V, t0, nt, H * V, v0, V, BT, BV)
    b_o = b_o * scale + mm(_load_scores(A, i_h, t0, nt, H, BT), b_v, DT, PREC)
    store_rows(o + i_h * V, b_o, t0, nt, H * V, v0, V, BT, BV)


@autotune(configs=state_configs("BV"), key=["K", "V"])
@triton.jit
def gla_state_bwd_kernel(
    q, gcum, do, dh, dht, dh0, chunk_offsets, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    """Reverse over the chunks of one sequence, with dS the gradient of the state leaving chunk c:
    dh[c] = dS, then dS <- diag(exp(gcum_C)) dS + scale (Q exp(gcum))^T dO."""
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
        b_q = load_rows(q + i_h * K, t0, nt, H * K, 0, K, BT, BK)
        b_q = b_q * tl.exp(load_rows(gcum + i_h * K, t0, nt, H * K, 0, K, BT, BK))
        b_last = load_row(gcum + i_h * K, t0 + nt - 1, H * K, 0, K, BK)
        b_do = load_rows(do + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_ds = b_ds * tl.exp(b_last)[:, None] + mm(tl.trans(b_q), b_do, DT, PREC) * scale
    if STORE_DH0:
        store_matrix(dh0 + s_base, b_ds, 0, K, v0, V, BK, BV)


@autotune(configs=chunk_configs(), key=["V"])
@triton.jit
def gla_dscores_bwd_kernel(
    v, do, dA, chunk_index, cu_seqlens, scale,
    H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk: the gradient of the scores, dA = scale tril(dO V^T), upper triangle zero."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    DT = v.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    b_da = tl.zeros([BT, BT], dtype=tl.float32)
    for v0 in range(0, V, BV):
        b_do = load_rows(do + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_v = load_rows(v + i_h * V, t0, nt, H * V, v0, V, BT, BV)
        b_da += mm(b_do, tl.trans(b_v), DT, PREC)
    o_t = tl.arange(0, BT)
    b_da = tl.where(o_t[:, None] >= o_t[None, :], b_da * scale, 0.0)
    store_rows(dA + i_h * BT, b_da, t0, nt, H * BT, 0, BT, BT, BT)


@autotune(configs=chunk_configs(), key=["K", "V"])
@triton.jit
def gla_dv_bwd_kernel(
    k, gcum, A, do, dh, dv, chunk_index, cu_seqlens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk and block of value channels: dV = A^T dO + (K exp(gcum_C - gcum)) dh[c]."""
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DT = k.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    v0 = i_v * BV
    s_base = (i_c.to(tl.int64) * H + i_h) * K * V
    b_do = load_rows(do + i_h * V, t0, nt, H * V, v0, V, BT, BV)
    b_dv = mm(tl.trans(_load_scores(A, i_h, t0, nt, H, BT)), b_do, DT, PREC)
    for k0 in range(0, K, BKC):
        b_g = load_rows(gcum + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        b_last = load_row(gcum + i_h * K, t0 + nt - 1, H * K, k0, K, BKC)
        b_k = load_rows(k + i_h * K, t0, nt, H * K, k0, K, BT, BKC) * tl.exp(b_last[None, :] - b_g)
        b_dv += mm(b_k, load_matrix(dh + s_base, k0, K, v0, V, BKC, BV), DT, PREC)
    store_rows(dv + i_h * V, b_dv, t0, nt, H * V, v0, V, BT, BV)


@triton.jit
def _intra_dq(k, gcum, dA, i_h, t0, nt, r, k0, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
              BC: tl.constexpr, BKC: tl.constexpr, PREC: tl.constexpr):
    """Sub-chunk r's dQ through the scores: sum_{j <= i} dA_ij k_j exp(gcum_i - gcum_j), the earlier
    sub-chunks through the reference point of r's first row, the diagonal element-wise."""
    DT = k.dtype.element_ty
    o = tl.arange(0, BC)
    tr, nr = t0 + r * BC, nt - r * BC
    valid = o < nr
    b_g = load_rows(gcum + i_h * K, tr, nr, H * K, k0, K, BC, BKC)
    ref = load_row(gcum + i_h * K, t0 + tl.minimum(r * BC, nt - 1), H * K, k0, K, BKC)
    acc = tl.zeros([BC, BKC], dtype=tl.float32)
    for s in range(r):
        b_k = load_rows(k + i_h * K, t0 + s * BC, nt - s * BC, H * K, k0, K, BC, BKC)
        b_gk = load_rows(gcum + i_h * K, t0 + s * BC, nt - s * BC, H * K, k0, K, BC, BKC)
        b_da = load_rows(dA + i_h * BT, tr, nr, H * BT, s * BC, BT, BC, BC)
        acc += mm(b_da, b_k * exp_rows(ref[None, :] - b_gk, o < nt - s * BC), DT, PREC)
    acc *= exp_rows(b_g - ref[None, :], valid)
    for j in range(BC):
        row = t0 + tl.minimum(r * BC + j, nt - 1)
        k_j = load_row(k + i_h * K, row, H * K, k0, K, BKC)
        g_j = load_row(gcum + i_h * K, row, H * K, k0, K, BKC)
        da_j = tl.load(dA + (tr + o).to(tl.int64) * H * BT + i_h * BT + r * BC + j, mask=valid, other=0.0)
        acc += da_j[:, None] * k_j[None, :] * exp_rows(b_g - g_j[None, :], (o >= j) & valid)
    return acc


@triton.jit
def _intra_dk(q, gcum, dA, i_h, t0, nt, r, k0, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
              BC: tl.constexpr, BKC: tl.constexpr, NB: tl.constexpr, PREC: tl.constexpr):
    """Sub-chunk r's dK through the scores: sum_{i >= j} dA_ij q_i exp(gcum_i - gcum_j), the later
    sub-chunks through the reference point of r's last row, the diagonal element-wise."""
    DT = q.dtype.element_ty
    o = tl.arange(0, BC)
    tr, nr = t0 + r * BC, nt - r * BC
    valid = o < nr
    b_g = load_rows(gcum + i_h * K, tr, nr, H * K, k0, K, BC, BKC)
    ref = load_row(gcum + i_h * K, t0 + tl.minimum(r * BC + BC - 1, nt - 1), H * K, k0, K, BKC)
    acc = tl.zeros([BC, BKC], dtype=tl.float32)
    for s in range(r + 1, NB):
        b_q = load_rows(q + i_h * K, t0 + s * BC, nt - s * BC, H * K, k0, K, BC, BKC)
        b_gq = load_rows(gcum + i_h * K, t0 + s * BC, nt - s * BC, H * K, k0, K, BC, BKC)
        b_da = load_rows(dA + i_h * BT, t0 + s * BC, nt - s * BC, H * BT, r * BC, BT, BC, BC)
        acc += mm(tl.trans(b_da), b_q * exp_rows(b_gq - ref[None, :], o < nt - s * BC), DT, PREC)
    acc *= exp_rows(ref[None, :] - b_g, valid)
    for i in range(BC):
        row = t0 + tl.minimum(r * BC + i, nt - 1)
        q_i = load_row(q + i_h * K, row, H * K, k0, K, BKC)
        g_i = load_row(gcum + i_h * K, row, H * K, k0, K, BKC)
        row_ok = (o * 0 + i) < nr
        da_i = tl.load(dA + row.to(tl.int64) * H * BT + i_h * BT + r * BC + o, mask=row_ok, other=0.0)
        acc += da_i[:, None] * q_i[None, :] * exp_rows(g_i[None, :] - b_g, (o <= i) & row_ok)
    return acc


@autotune(configs=chunk_configs(), key=["K", "V"])
@triton.jit
def gla_dqk_bwd_kernel(
    q, k, v, gcum, h, dh, dA, do, dq, dk, dgcum, chunk_index, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    BKC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per sub-chunk of BC rows and key slice: dQ = scale exp(gcum) (dO S^T) + (scores path),
    dK = exp(gcum_C - gcum) (V dS^T) + (scores path), dgcum = Q dQ - K dK, plus at the chunk's last row
    rowsum(S_leaving dS) with S_leaving = diag(exp(gcum_C)) S + (K exp(gcum_C - gcum))^T V."""
    NB: tl.constexpr = BT // BC
    i_cr, i_k, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c, r = i_cr // NB, i_cr % NB
    DT = q.dtype.element_ty
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    tr, nr = t0 + r * BC, nt - r * BC
    k0 = i_k * BKC
    o = tl.arange(0, BC)
    valid = o < nr
    s_base = (i_c.to(tl.int64) * H + i_h) * K * V
    b_q = load_rows(q + i_h * K, tr, nr, H * K, k0, K, BC, BKC).to(tl.float32)
    b_k = load_rows(k + i_h * K, tr, nr, H * K, k0, K, BC, BKC).to(tl.float32)
    b_g = load_rows(gcum + i_h * K, tr, nr, H * K, k0, K, BC, BKC)
    b_last = load_row(gcum + i_h * K, t0 + nt - 1, H * K, k0, K, BKC)
    b_dq = tl.zeros([BC, BKC], dtype=tl.float32)
    b_dk = tl.zeros([BC, BKC], dtype=tl.float32)
    for v0 in range(0, V, BV):
        b_do = load_rows(do + i_h * V, tr, nr, H * V, v0, V, BC, BV)
        b_v = load_rows(v + i_h * V, tr, nr, H * V, v0, V, BC, BV)
        b_dq += mm(b_do, tl.trans(load_matrix(h + s_base, k0, K, v0, V, BKC, BV)), DT, PREC)
        b_dk += mm(b_v, tl.trans(load_matrix(dh + s_base, k0, K, v0, V, BKC, BV)), DT, PREC)
    b_dq = b_dq * scale * tl.exp(b_g) + _intra_dq(k, gcum, dA, i_h, t0, nt, r, k0, H, K, BT, BC, BKC, PREC)
    b_dk = b_dk * exp_rows(b_last[None, :] - b_g, valid)
    b_dk += _intra_dk(q, gcum, dA, i_h, t0, nt, r, k0, H, K, BT, BC, BKC, NB, PREC)
    b_dgcum = b_q * b_dq - b_k * b_dk
    if (nt - 1) // BC == r:
        # The chunk's total decay gcum_C reaches the loss through the state it leaves behind.
        b_gc = load_rows(gcum + i_h * K, t0, nt, H * K, k0, K, BT, BKC)
        b_kc = load_rows(k + i_h * K, t0, nt, H * K, k0, K, BT, BKC) * tl.exp(b_last[None, :] - b_gc)
        b_term = tl.zeros([BKC], dtype=tl.float32)
        for v0 in range(0, V, BV):
            b_s = load_matrix(h + s_base, k0, K, v0, V, BKC, BV).to(tl.float32) * tl.exp(b_last)[:, None]
            b_s += mm(tl.trans(b_kc), load_rows(v + i_h * V, t0, nt, H * V, v0, V, BT, BV), DT, PREC)
            b_term += tl.sum(b_s * load_matrix(dh + s_base, k0, K, v0, V, BKC, BV).to(tl.float32), 1)
        b_dgcum += tl.where((o == nr - 1)[:, None], b_term[None, :], 0.0)
    store_rows(dq + i_h * K, b_dq, tr, nr, H * K, k0, K, BC, BKC)
    store_rows(dk + i_h * K, b_dk, tr, nr, H * K, k0, K, BC, BKC)
    store_rows(dgcum + i_h * K, b_dgcum, tr, nr, H * K, k0, K, BC, BKC)


@autotune(configs=state_configs("BV"), key=["K", "V"])
@triton.jit
def gla_recurrent_fwd_kernel(
    q, k, v, g, o, h0, ht, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    """One token at a time, the state in registers: S <- diag(exp(g_t)) S + k_t v_t^T, o_t = scale S^T q_t."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    v0 = i_v * BV
    s_base = i_nh.to(tl.int64) * K * V
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_s += load_matrix(h0 + s_base, 0, K, v0, V, BK, BV)
    o_k = tl.arange(0, BK)
    o_v = v0 + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    for t in range(bos, eos):
        b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_g = tl.load(g + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_s = b_s * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_s * b_q[:, None], 0) * scale
        tl.store(o + (t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        store_matrix(ht + s_base, b_s, 0, K, v0, V, BK, BV)


KERNELS = (
    gla_state_fwd_kernel,
    gla_intra_fwd_kernel,
    gla_output_fwd_kernel,
    gla_state_bwd_kernel,
    gla_dscores_bwd_kernel,
    gla_dv_bwd_kernel,
    gla_dqk_bwd_kernel,
    gla_recurrent_fwd_kernel,
)


def _states(k, v, gcum, h0, chunking: Chunking, store_final: bool, sizes, prec):
    L, H, K = k.shape
    V = v.shape[-1]
    N = chunking.num_sequences
    h = empty(chunking.num_chunks, H, K, V, dtype=k.dtype, device=k.device)
    ht = empty(N, H, K, V, dtype=torch.float32, device=k.device) if store_final else None
    gla_state_fwd_kernel[lambda meta: (N * H, triton.cdiv(V, meta["BV"]))](
        k, v, gcum, h, h0, ht, chunking.chunk_offsets, chunking.cu_seqlens,
        H=H, K=K, V=V, BT=CHUNK, BK=sizes["BK"], PREC=prec, HAS_H0=h0 is not None, STORE_HT=store_final,
    )
    return h, ht


def _scores(q, k, gcum, scale, chunking: Chunking, sizes, prec):
    L, H, K = q.shape
    A = empty(L, H, CHUNK, dtype=torch.float32, device=q.device)
    gla_intra_fwd_kernel[(chunking.num_chunks, H)](
        q, k, gcum, A, chunking.chunk_index, chunking.cu_seqlens, scale,
        H=H, K=K, BT=CHUNK, BC=SUB, BKC=sizes["BKC"], PREC=prec,
    )
    return A


def chunk_gla_fwd(q, k, v, g, scale, h0, chunking: Chunking, store_final: bool):
    """Chunked forward. Returns (o [L, H, V], final state [N, H, K, V] float32 or None,
    gcum [L, H, K] float32 and the scores A [L, H, 64] float32, both kept for the backward)."""
    L, H, K = q.shape
    V = v.shape[-1]
    sizes, prec = key_value_blocks(K, V), dot_precision(q.dtype)
    gcum = chunk_local_cumsum(g, chunking)
    h, ht = _states(k, v, gcum, h0, chunking, store_final, sizes, prec)
    A = _scores(q, k, gcum, scale, chunking, sizes, prec)
    o = empty(L, H, V, dtype=q.dtype, device=q.device)
    gla_output_fwd_kernel[(chunking.num_chunks, triton.cdiv(V, sizes["BV"]), H)](
        q, v, gcum, h, A, o, chunking.chunk_index, chunking.cu_seqlens, scale,
        H=H, K=K, V=V, BT=CHUNK, BKC=sizes["BKC"], BV=sizes["BV"], PREC=prec,
    )
    return o, ht, gcum, A


def chunk_gla_bwd(q, k, v, gcum, A, scale, h0, chunking: Chunking, do, dht, need_dh0: bool):
    """Chunked backward. Returns (dq, dk, dv) in the inputs' dtype, dg [L, H, K] float32 and dh0
    (float32) or None."""
    L, H, K = q.shape
    V = v.shape[-1]
    sizes, prec = key_value_blocks(K, V), dot_precision(q.dtype)
    BKC, BV = sizes["BKC"], sizes["BV"]
    N, NC = chunking.num_sequences, chunking.num_chunks
    idx, cu = chunking.chunk_index, chunking.cu_seqlens
    dev = q.device
    h, _ = _states(k, v, gcum, h0, chunking, False, sizes, prec)
    dh = empty(NC, H, K, V, dtype=q.dtype, device=dev)
    dh0 = empty(N, H, K, V, dtype=torch.float32, device=dev) if need_dh0 else None
    gla_state_bwd_kernel[lambda meta: (N * H, triton.cdiv(V, meta["BV"]))](
        q, gcum, do, dh, dht, dh0, chunking.chunk_offsets, cu, scale,
        H=H, K=K, V=V, BT=CHUNK, BK=sizes["BK"], PREC=prec, HAS_DHT=dht is not None, STORE_DH0=need_dh0,
    )
    dA = empty(L, H, CHUNK, dtype=torch.float32, device=dev)
    gla_dscores_bwd_kernel[(NC, H)](v, do, dA, idx, cu, scale, H=H, V=V, BT=CHUNK, BV=BV, PREC=prec)
    dv = empty(L, H, V, dtype=v.dtype, device=dev)
    gla_dv_bwd_kernel[(NC, triton.cdiv(V, BV), H)](
        k, gcum, A, do, dh, dv, idx, cu, H=H, K=K, V=V, BT=CHUNK, BKC=BKC, BV=BV, PREC=prec,
    )
    dq = empty(L, H, K, dtype=q.dtype, device=dev)
    dk = empty(L, H, K, dtype=k.dtype, device=dev)
    dgcum = empty(L, H, K, dtype=torch.float32, device=dev)
    gla_dqk_bwd_kernel[(NC * (CHUNK // SUB), triton.cdiv(K, BKC), H)](
        q, k, v, gcum, h, dh, dA, do, dq, dk, dgcum, idx, cu, scale,
        H=H, K=K, V=V, BT=CHUNK, BC=SUB, BKC=BKC, BV=BV, PREC=prec,
    )
    # gcum is the in-chunk cumulative sum of g, so g's gradient is the reverse in-chunk cumulative sum of gcum's.
    return dq, dk, dv, chunk_local_cumsum(dgcum, chunking, reverse=True), dh0


def recurrent_gla_fwd(q, k, v, g, scale, h0, cu_seqlens: torch.Tensor, store_final: bool):
    """Token-by-token forward (no backward): decoding and short prefills. Returns (o, final state or None)."""
    L, H, K = q.shape
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    o = empty(L, H, V, dtype=q.dtype, device=q.device)
    ht = empty(N, H, K, V, dtype=torch.float32, device=q.device) if store_final else None
    gla_recurrent_fwd_kernel[lambda meta: (N * H, triton.cdiv(V, meta["BV"]))](
        q, k, v, g, o, h0, ht, cu_seqlens, scale,
        H=H, K=K, V=V, BK=key_value_blocks(K, V)["BK"], HAS_H0=h0 is not None, STORE_HT=store_final,
    )
    return o, ht
