"""Fused Triton kernels of Mamba-2's SSD: the chunked form (forward, backward) and a recurrent decoder.

Inputs arrive packed: x, z ``[L, H, P]``, dt ``[L, H]``, B, C ``[L, G, N]``
with ``L`` the total number of tokens and sequence boundaries in a
:class:`~seqmix.kernels.sequences.Chunking`. Head ``h`` reads group
``h // (H // G)`` of B and C. The forward runs three kernels
(docs/math/mamba2.md gives the algebra):

1. ``dt_fwd``: per chunk and block of heads, dt' = clamp(softplus(dt + bias))
   and the chunk-local cumulative log-decay ``lcum_t = sum_{j<=t} dt'_j A``.
2. ``state_fwd``: per sequence, head and block of P, the only sequential pass:
   stores the state entering each chunk and applies
   ``h <- exp(lcum_last) h + sum_j exp(lcum_last - lcum_j) dt'_j x_j B_j^T``.
3. ``output_fwd``: per chunk, ``Y = (M * C B^T)(dt' x) + exp(lcum) (C h^T) + D x``,
   ``M_ij = exp(lcum_i - lcum_j)`` for j <= i, then the gate ``silu(z)``.

Decays are only ever exponentiated as differences ``lcum_i - lcum_j`` with i >= j
(or ``lcum_i`` itself): every exponent is <= 0 since dt' >= 0 and A < 0, so a
strong decay underflows to 0 and never overflows. Masked entries are set to
-inf before ``exp``.

The backward recomputes the per-chunk states (they would cost P*N values per
chunk to keep), runs the reverse state pass (the state gradient leaving each
chunk), then per chunk the gradients of x, dt' (direct part) and lcum
(``dx`` kernel), of B and C per head (``dbc`` kernel, summed over the heads
of a group afterwards), and last turns the gradient of lcum into those of dt,
A and dt_bias (``dt_bwd``: a reverse cumulative sum inside each chunk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmix.kernels.alloc import empty
from seqmix.kernels.sequences import Chunking
from seqmix.kernels.triton_common import (
    SOFTPLUS_THRESHOLD,
    autotune,
    chunk_configs,
    chunk_position,
    dot_precision,
    head_block,
    load_matrix,
    load_row_values,
    load_rows,
    mm,
    sequence_bounds,
    sequence_program,
    silu,
    softplus,
    softplus_backward,
    state_configs,
    store_matrix,
    store_row_values,
    store_rows,
)
from seqmix.kernels.triton_limits import SSD_CHUNK as CHUNK


@triton.jit
def _processed_dt(raw, lo, hi, SOFTPLUS: tl.constexpr):
    """dt' = clamp(softplus?(raw), lo, hi) of float32 ``raw``."""
    if SOFTPLUS:
        raw = softplus(raw)
    return tl.minimum(tl.maximum(raw, lo), hi)


@triton.jit
def _head_tile(base, t0, nt, h0, H: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    """Pointers and mask of the [BT, BH] tile of a [L, H] tensor: tokens t0 .. t0+nt-1, heads h0 ..."""
    rows = tl.arange(0, BT)
    cols = h0 + tl.arange(0, BH)
    ptrs = base + t0 * H + (rows[:, None] * H + cols[None, :])
    return ptrs, (rows < nt)[:, None] & (cols < H)[None, :]


@triton.jit
def _chunk_decays(lcum, i_h, t0, nt, H: tl.constexpr, BT: tl.constexpr):
    """A chunk's log-decays lcum [BT] (0 past nt), lcum of its last token, and exp(lcum_last - lcum_j)
    per row (0 past nt): how much of token j's write is left at the end of the chunk."""
    b_l = load_row_values(lcum + i_h, t0, nt, H, BT)
    l_last = tl.load(lcum + (t0 + nt - 1) * H + i_h).to(tl.float32)
    rows = tl.arange(0, BT)
    to_end = tl.exp(tl.where(rows < nt, l_last - b_l, float("-inf")))
    return b_l, l_last, to_end


@triton.jit
def _causal_decay(b_l, nt, BT: tl.constexpr, TRANSPOSED: tl.constexpr):
    """M_ij = exp(lcum_i - lcum_j) for j <= i < nt, else 0 (or its transpose): masked before exp."""
    o = tl.arange(0, BT)
    if TRANSPOSED:
        keep = (o[:, None] <= o[None, :]) & (o[None, :] < nt)
        diff = b_l[None, :] - b_l[:, None]
    else:
        keep = (o[:, None] >= o[None, :]) & (o[:, None] < nt)
        diff = b_l[:, None] - b_l[None, :]
    return tl.exp(tl.where(keep, diff, float("-inf")))


@triton.jit
def _chunk_program(chunk_index, cu_seqlens, H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                   BT: tl.constexpr):
    """A per-chunk program of grid (chunk, block, head): chunk i_c, block i_b, head i_h, its group i_g,
    the chunk's first token t0 and rows nt, and the offset of its [P, N] state in a per-chunk buffer."""
    i_c, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    return i_c, i_b, i_h, i_h // (H // G), t0, nt, (i_c.to(tl.int64) * H + i_h) * P * N


@autotune(configs=chunk_configs(), key=["H"])
@triton.jit
def ssd_dt_fwd_kernel(
    dt, dt_bias, A, dtp, lcum, chunk_index, cu_seqlens, lo, hi,
    H: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Per chunk and block of heads: dt' and the chunk-local cumulative log-decay lcum = cumsum(dt' A)."""
    i_c, i_hb = tl.program_id(0), tl.program_id(1)
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    h0 = i_hb * BH
    ptrs, mask = _head_tile(dt, t0, nt, h0, H, BT, BH)
    cols = h0 + tl.arange(0, BH)
    raw = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(dt_bias + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    b_dtp = tl.where(mask, _processed_dt(raw, lo, hi, SOFTPLUS), 0.0)
    b_a = tl.load(A + cols, mask=cols < H, other=0.0).to(tl.float32)
    b_l = tl.cumsum(b_dtp * b_a[None, :], 0)
    out_ptrs, _ = _head_tile(dtp, t0, nt, h0, H, BT, BH)
    tl.store(out_ptrs, b_dtp, mask=mask)
    out_ptrs, _ = _head_tile(lcum, t0, nt, h0, H, BT, BH)
    tl.store(out_ptrs, b_l, mask=mask)


@autotune(configs=state_configs("BP"), key=["P", "N"])
@triton.jit
def ssd_state_fwd_kernel(
    x, B, dtp, lcum, h, h0, ht, chunk_offsets, cu_seqlens,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, PREC: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    """Sequential over the chunks of one sequence: h[c] = state entering chunk c, then
    state <- exp(lcum_last) state + (x * dt' * exp(lcum_last - lcum))^T B."""
    i_h, i_p, bos, eos, c0, s_base = sequence_program(chunk_offsets, cu_seqlens, H, P * N)
    i_g, p0 = i_h // (H // G), i_p * BP
    DT = x.dtype.element_ty
    b_s = tl.zeros([BP, BN], dtype=tl.float32)
    if HAS_H0:
        b_s += load_matrix(h0 + s_base, p0, P, 0, N, BP, BN)
    for i_t in range(tl.cdiv(eos - bos, BT)):
        t0 = bos + i_t * BT
        nt = tl.minimum(eos - t0, BT)
        store_matrix(h + ((c0 + i_t) * H + i_h) * P * N, b_s, p0, P, 0, N, BP, BN)
        _, l_last, to_end = _chunk_decays(lcum, i_h, t0, nt, H, BT)
        b_w = load_row_values(dtp + i_h, t0, nt, H, BT) * to_end
        b_x = load_rows(x + i_h * P, t0, nt, H * P, p0, P, BT, BP).to(tl.float32) * b_w[:, None]
        b_b = load_rows(B + i_g * N, t0, nt, G * N, 0, N, BT, BN)
        b_s = b_s * tl.exp(l_last) + mm(tl.trans(b_x), b_b, DT, PREC)
    if STORE_HT:
        store_matrix(ht + s_base, b_s, p0, P, 0, N, BP, BN)


@autotune(configs=chunk_configs(), key=["P", "N"])
@triton.jit
def ssd_output_fwd_kernel(
    x, z, B, C, D, dtp, lcum, h, y, out, chunk_index, cu_seqlens,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    BT: tl.constexpr, BP: tl.constexpr, BNC: tl.constexpr, PREC: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, STORE_Y: tl.constexpr,
):
    """Per chunk and block of P: y = (M * C B^T)(dt' x) + exp(lcum) (C h^T) + D x; out = y silu(z).
    With STORE_Y the ungated y is kept for the gate's backward."""
    _, i_p, i_h, i_g, t0, nt, s_base = _chunk_program(chunk_index, cu_seqlens, H, G, P, N, BT)
    DT = x.dtype.element_ty
    p0 = i_p * BP
    b_cb = tl.zeros([BT, BT], dtype=tl.float32)
    b_y = tl.zeros([BT, BP], dtype=tl.float32)
    for n0 in range(0, N, BNC):
        b_c = load_rows(C + i_g * N, t0, nt, G * N, n0, N, BT, BNC)
        b_b = load_rows(B + i_g * N, t0, nt, G * N, n0, N, BT, BNC)
        b_cb += mm(b_c, tl.trans(b_b), DT, PREC)
        b_y += mm(b_c, tl.trans(load_matrix(h + s_base, p0, P, n0, N, BP, BNC)), DT, PREC)
    b_l = load_row_values(lcum + i_h, t0, nt, H, BT)
    b_w = load_row_values(dtp + i_h, t0, nt, H, BT)
    b_x = load_rows(x + i_h * P, t0, nt, H * P, p0, P, BT, BP)
    b_y = b_y * tl.exp(b_l)[:, None]
    b_y += mm(b_cb * _causal_decay(b_l, nt, BT, False), b_x.to(tl.float32) * b_w[:, None], DT, PREC)
    if HAS_D:
        b_y += tl.load(D + i_h).to(tl.float32) * b_x.to(tl.float32)
    if STORE_Y:
        store_rows(y + i_h * P, b_y, t0, nt, H * P, p0, P, BT, BP)
    if HAS_Z:
        b_y = b_y * silu(load_rows(z + i_h * P, t0, nt, H * P, p0, P, BT, BP).to(tl.float32))
    store_rows(out + i_h * P, b_y, t0, nt, H * P, p0, P, BT, BP)


@autotune(configs=state_configs("BP"), key=["P", "N"])
@triton.jit
def ssd_state_bwd_kernel(
    C, dy, lcum, dh, dht, dh0, chunk_offsets, cu_seqlens,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, PREC: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    """Reverse over the chunks of one sequence. With dS the gradient of the state leaving
    chunk c: dh[c] = dS, then dS <- exp(lcum_last) dS + (dY * exp(lcum))^T C."""
    i_h, i_p, bos, eos, c0, s_base = sequence_program(chunk_offsets, cu_seqlens, H, P * N)
    i_g, p0 = i_h // (H // G), i_p * BP
    DT = dy.dtype.element_ty
    b_ds = tl.zeros([BP, BN], dtype=tl.float32)
    if HAS_DHT:
        b_ds += load_matrix(dht + s_base, p0, P, 0, N, BP, BN)
    NT = tl.cdiv(eos - bos, BT)
    for j in range(NT):
        i_t = NT - 1 - j
        t0 = bos + i_t * BT
        nt = tl.minimum(eos - t0, BT)
        store_matrix(dh + ((c0 + i_t) * H + i_h) * P * N, b_ds, p0, P, 0, N, BP, BN)
        b_l, l_last, _ = _chunk_decays(lcum, i_h, t0, nt, H, BT)
        b_dy = load_rows(dy + i_h * P, t0, nt, H * P, p0, P, BT, BP).to(tl.float32) * tl.exp(b_l)[:, None]
        b_c = load_rows(C + i_g * N, t0, nt, G * N, 0, N, BT, BN)
        b_ds = b_ds * tl.exp(l_last) + mm(tl.trans(b_dy), b_c, DT, PREC)
    if STORE_DH0:
        store_matrix(dh0 + s_base, b_ds, p0, P, 0, N, BP, BN)


@autotune(configs=chunk_configs(), key=["P", "N"])
@triton.jit
def ssd_dx_bwd_kernel(
    x, B, C, D, dtp, lcum, h, dh, dy, dx, ddt_part, dl_part, dd_part, chunk_index, cu_seqlens, part_stride,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    BT: tl.constexpr, BP: tl.constexpr, BNC: tl.constexpr, PREC: tl.constexpr, HAS_D: tl.constexpr,
):
    """Per chunk and block of P, with h = state entering, dS = gradient of the state leaving the chunk:

    Gx_j = sum_{i>=j} M_ij (C_i . B_j) dY_i + exp(lcum_last - lcum_j) dS B_j
    dx = dt' Gx + D dY; the direct part of d(dt')_j = x_j . Gx_j; and dlcum, the gradient of the
    log-decays, summed over this block of P. Partial sums of block i_p go to
    ``ddt_part``/``dl_part`` [n_p, L, H] at offset ``i_p * part_stride`` and ``dd_part`` [n_p, NC, H];
    the host adds the blocks up.
    """
    i_c, i_p, i_h, i_g, t0, nt, s_base = _chunk_program(chunk_index, cu_seqlens, H, G, P, N, BT)
    DT = x.dtype.element_ty
    p0 = i_p * BP
    b_bc = tl.zeros([BT, BT], dtype=tl.float32)  # (j, i): B_j . C_i
    b_bds = tl.zeros([BT, BP], dtype=tl.float32)  # B dS^T
    b_ch = tl.zeros([BT, BP], dtype=tl.float32)  # C h^T
    e_state = tl.zeros([BP], dtype=tl.float32)  # <dS, h> per row of the state
    for n0 in range(0, N, BNC):
        b_b = load_rows(B + i_g * N, t0, nt, G * N, n0, N, BT, BNC)
        b_c = load_rows(C + i_g * N, t0, nt, G * N, n0, N, BT, BNC)
        b_ds = load_matrix(dh + s_base, p0, P, n0, N, BP, BNC)
        b_h = load_matrix(h + s_base, p0, P, n0, N, BP, BNC)
        b_bc += mm(b_b, tl.trans(b_c), DT, PREC)
        b_bds += mm(b_b, tl.trans(b_ds), DT, PREC)
        b_ch += mm(b_c, tl.trans(b_h), DT, PREC)
        e_state += tl.sum(b_ds.to(tl.float32) * b_h.to(tl.float32), 1)
    b_l, l_last, to_end = _chunk_decays(lcum, i_h, t0, nt, H, BT)
    b_w = load_row_values(dtp + i_h, t0, nt, H, BT)
    b_x = load_rows(x + i_h * P, t0, nt, H * P, p0, P, BT, BP)
    b_dy = load_rows(dy + i_h * P, t0, nt, H * P, p0, P, BT, BP)
    b_st = b_bc * _causal_decay(b_l, nt, BT, True)  # (j, i): M_ij (C_i . B_j)
    b_gx = mm(b_st, b_dy, DT, PREC) + b_bds * to_end[:, None]
    b_xf, b_dyf = b_x.to(tl.float32), b_dy.to(tl.float32)
    b_dx = b_gx * b_w[:, None]
    if HAS_D:
        b_dx += tl.load(D + i_h).to(tl.float32) * b_dyf
    store_rows(dx + i_h * P, b_dx, t0, nt, H * P, p0, P, BT, BP)
    # Gradient of lcum: lcum_i enters as +lcum_i and lcum_j as -lcum_j in M_ij (S below), as +lcum_i in
    # exp(lcum_i) C_i h, and the chunk's last lcum in the state it passes on (the R terms and <dS, exp(lcum_last) h>).
    # S_ii and the last row's R enter with both signs: they are left out rather than cancelled in
    # float32, where they would dominate (a large dt' makes them large) a gradient that may be tiny.
    rows = tl.arange(0, BT)
    b_s = b_st * mm(b_x, tl.trans(b_dy), DT, PREC) * b_w[:, None]  # (j, i): S_ij
    b_s = tl.where(rows[:, None] < rows[None, :], b_s, 0.0)
    b_r = tl.where(rows < nt - 1, to_end * b_w * tl.sum(b_xf * b_bds, 1), 0.0)
    b_dl = tl.sum(b_s, 0) - tl.sum(b_s, 1) + tl.exp(b_l) * tl.sum(b_dyf * b_ch, 1) - b_r
    end_term = tl.sum(b_r, 0) + tl.exp(l_last) * tl.sum(e_state, 0)
    b_dl += tl.where(rows == nt - 1, end_term, 0.0)
    part = i_p.to(tl.int64) * part_stride
    store_row_values(ddt_part + part + i_h, tl.sum(b_xf * b_gx, 1), t0, nt, H, BT)
    store_row_values(dl_part + part + i_h, b_dl, t0, nt, H, BT)
    if HAS_D:
        tl.store(dd_part + (i_p * tl.num_programs(0) + i_c) * H + i_h, tl.sum(tl.sum(b_xf * b_dyf, 1), 0))


@autotune(configs=chunk_configs(), key=["P", "N"])
@triton.jit
def ssd_dbc_bwd_kernel(
    x, B, C, dtp, lcum, h, dh, dy, db, dc, chunk_index, cu_seqlens,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    BT: tl.constexpr, BPC: tl.constexpr, BNC: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk, head and block of N, with W_ij = M_ij (dY_i . x_j) dt'_j:
    dC = W B + exp(lcum) (dY h), dB = W^T C + exp(lcum_last - lcum) dt' (x dS); per head, float32
    (the heads of a group are added up afterwards)."""
    _, i_nb, i_h, i_g, t0, nt, s_base = _chunk_program(chunk_index, cu_seqlens, H, G, P, N, BT)
    DT = x.dtype.element_ty
    n0 = i_nb * BNC
    b_dyx = tl.zeros([BT, BT], dtype=tl.float32)
    b_dyh = tl.zeros([BT, BNC], dtype=tl.float32)
    b_xds = tl.zeros([BT, BNC], dtype=tl.float32)
    for p0 in range(0, P, BPC):
        b_dy = load_rows(dy + i_h * P, t0, nt, H * P, p0, P, BT, BPC)
        b_x = load_rows(x + i_h * P, t0, nt, H * P, p0, P, BT, BPC)
        b_dyx += mm(b_dy, tl.trans(b_x), DT, PREC)
        b_dyh += mm(b_dy, load_matrix(h + s_base, p0, P, n0, N, BPC, BNC), DT, PREC)
        b_xds += mm(b_x, load_matrix(dh + s_base, p0, P, n0, N, BPC, BNC), DT, PREC)
    b_l, _, to_end = _chunk_decays(lcum, i_h, t0, nt, H, BT)
    b_w = load_row_values(dtp + i_h, t0, nt, H, BT)
    b_wm = b_dyx * _causal_decay(b_l, nt, BT, False) * b_w[None, :]
    b_b = load_rows(B + i_g * N, t0, nt, G * N, n0, N, BT, BNC)
    b_c = load_rows(C + i_g * N, t0, nt, G * N, n0, N, BT, BNC)
    b_dc = mm(b_wm, b_b, DT, PREC) + b_dyh * tl.exp(b_l)[:, None]
    b_db = mm(tl.trans(b_wm), b_c, DT, PREC) + b_xds * (to_end * b_w)[:, None]
    store_rows(dc + i_h * N, b_dc, t0, nt, H * N, n0, N, BT, BNC)
    store_rows(db + i_h * N, b_db, t0, nt, H * N, n0, N, BT, BNC)


@autotune(configs=chunk_configs(), key=["H"])
@triton.jit
def ssd_dt_bwd_kernel(
    dt, dt_bias, A, dtp, ddt_direct, dl, ddt, da_part, chunk_index, cu_seqlens, lo, hi,
    H: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Per chunk and block of heads, from dlcum to dt and A: lcum_t = sum_{j<=t} dt'_j A, so
    d(dt'_t A) = sum_{i>=t} dlcum_i (a reverse cumulative sum), d(dt') = direct + A that,
    dA = sum_t dt'_t that (per chunk, added up afterwards); then back through clamp and softplus."""
    i_c, i_hb = tl.program_id(0), tl.program_id(1)
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    h0 = i_hb * BH
    cols = h0 + tl.arange(0, BH)
    ptrs, mask = _head_tile(dt, t0, nt, h0, H, BT, BH)
    raw = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(dt_bias + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    ptrs, _ = _head_tile(dl, t0, nt, h0, H, BT, BH)
    b_rev = tl.cumsum(tl.load(ptrs, mask=mask, other=0.0), 0, reverse=True)
    ptrs, _ = _head_tile(dtp, t0, nt, h0, H, BT, BH)
    b_dtp = tl.load(ptrs, mask=mask, other=0.0)
    ptrs, _ = _head_tile(ddt_direct, t0, nt, h0, H, BT, BH)
    b_a = tl.load(A + cols, mask=cols < H, other=0.0).to(tl.float32)
    b_ddtp = tl.load(ptrs, mask=mask, other=0.0) + b_a[None, :] * b_rev
    tl.store(da_part + i_c * H + cols, tl.sum(b_dtp * b_rev, 0), mask=cols < H)
    if SOFTPLUS:
        b_ddtp = softplus_backward(b_ddtp, raw)
        raw = softplus(raw)
    b_ddtp = tl.where((raw >= lo) & (raw <= hi), b_ddtp, 0.0)
    ptrs, _ = _head_tile(ddt, t0, nt, h0, H, BT, BH)
    tl.store(ptrs, b_ddtp, mask=mask)


@autotune(configs=state_configs("BP"), key=["P", "N"])
@triton.jit
def ssd_recurrent_fwd_kernel(
    x, dt, A, B, C, D, z, dt_bias, out, h0, ht, cu_seqlens, lo, hi,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    """One token at a time, the [BP, N] state slice in registers: decoding and short prefills.
    h = exp(dt' A) h + dt' x B^T, y = h C + D x, y *= silu(z)."""
    i_nh, i_p = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // (H // G)
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    p0 = i_p * BP
    o_p = p0 + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    m_p, m_n = o_p < P, o_n < N
    s_base = i_nh.to(tl.int64) * P * N
    b_s = tl.zeros([BP, BN], dtype=tl.float32)
    if HAS_H0:
        b_s += load_matrix(h0 + s_base, p0, P, 0, N, BP, BN)
    b_a = tl.load(A + i_h).to(tl.float32)
    b_bias = tl.load(dt_bias + i_h).to(tl.float32) if HAS_BIAS else 0.0
    b_d = tl.load(D + i_h).to(tl.float32) if HAS_D else 0.0
    # The token loop calls no jit helpers: in Triton's interpreter every such call costs milliseconds.
    for t in range(bos, eos):
        b_dt = tl.load(dt + t * H + i_h).to(tl.float32) + b_bias
        if SOFTPLUS:
            b_dt = tl.where(b_dt > SOFTPLUS_THRESHOLD, b_dt,
                            tl.log(1.0 + tl.exp(tl.minimum(b_dt, SOFTPLUS_THRESHOLD))))
        b_dt = tl.minimum(tl.maximum(b_dt, lo), hi)
        b_x = tl.load(x + (t * H + i_h) * P + o_p, mask=m_p, other=0.0).to(tl.float32)
        b_b = tl.load(B + (t * G + i_g) * N + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_c = tl.load(C + (t * G + i_g) * N + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_s = b_s * tl.exp(b_dt * b_a) + (b_dt * b_x)[:, None] * b_b[None, :]
        b_y = tl.sum(b_s * b_c[None, :], 1) + b_d * b_x
        if HAS_Z:
            b_z = tl.load(z + (t * H + i_h) * P + o_p, mask=m_p, other=0.0).to(tl.float32)
            b_y = b_y * b_z / (1.0 + tl.exp(-b_z))
        tl.store(out + (t * H + i_h) * P + o_p, b_y.to(out.dtype.element_ty), mask=m_p)
    if STORE_HT:
        store_matrix(ht + s_base, b_s, p0, P, 0, N, BP, BN)


KERNELS = (
    ssd_dt_fwd_kernel,
    ssd_state_fwd_kernel,
    ssd_output_fwd_kernel,
    ssd_state_bwd_kernel,
    ssd_dx_bwd_kernel,
    ssd_dbc_bwd_kernel,
    ssd_dt_bwd_kernel,
    ssd_recurrent_fwd_kernel,
)


def block_sizes(P: int, N: int, H: int) -> dict[str, int]:
    """BN covers the state dim (state tiles), BNC / BPC are the slices of N / P that per-chunk
    kernels walk, BP the block of P a per-chunk program owns, BH the heads of the dt kernels."""
    return {"BN": head_block(N), "BNC": min(64, head_block(N)), "BPC": min(64, head_block(P)),
            "BP": min(64, head_block(P)), "BH": min(16, triton.next_power_of_2(H))}


class DtConfig:
    """How dt becomes dt': an optional bias, softplus, and the clamp to [lo, hi]."""

    def __init__(self, softplus: bool, limit: tuple[float, float]):
        self.softplus = softplus
        self.lo, self.hi = float(limit[0]), float(limit[1])


def _dt_fwd(dt, dt_bias, A, chunking: Chunking, cfg: DtConfig, sizes):
    L, H = dt.shape
    dtp = empty(L, H, dtype=torch.float32, device=dt.device)
    lcum = empty(L, H, dtype=torch.float32, device=dt.device)
    ssd_dt_fwd_kernel[(chunking.num_chunks, triton.cdiv(H, sizes["BH"]))](
        dt, dt_bias, A, dtp, lcum, chunking.chunk_index, chunking.cu_seqlens, cfg.lo, cfg.hi,
        H=H, BT=CHUNK, BH=sizes["BH"], HAS_BIAS=dt_bias is not None, SOFTPLUS=cfg.softplus,
    )
    return dtp, lcum


def _states(x, B, dtp, lcum, h0, chunking: Chunking, store_final: bool, sizes, prec):
    """The state entering each chunk [NC, H, P, N] (x's dtype) and the final state (float32) or None."""
    _, H, P = x.shape
    G, N = B.shape[1:]
    Nseq = chunking.num_sequences
    h = empty(chunking.num_chunks, H, P, N, dtype=x.dtype, device=x.device)
    ht = empty(Nseq, H, P, N, dtype=torch.float32, device=x.device) if store_final else None
    ssd_state_fwd_kernel[lambda meta: (Nseq * H, triton.cdiv(P, meta["BP"]))](
        x, B, dtp, lcum, h, h0, ht, chunking.chunk_offsets, chunking.cu_seqlens,
        H=H, G=G, P=P, N=N, BT=CHUNK, BN=sizes["BN"], PREC=prec, HAS_H0=h0 is not None, STORE_HT=store_final,
    )
    return h, ht


def chunk_ssd_fwd(x, dt, A, B, C, D, z, dt_bias, h0, cfg: DtConfig, chunking: Chunking, store_final: bool):
    """Chunked forward. Returns (out [L, H, P], final state [Nseq, H, P, N] float32 or None, and for the
    backward: dt' and lcum [L, H] float32, the ungated y [L, H, P] when z is given, else None)."""
    L, H, P = x.shape
    G, N = B.shape[1:]
    sizes, prec = block_sizes(P, N, H), dot_precision(x.dtype)
    dtp, lcum = _dt_fwd(dt, dt_bias, A, chunking, cfg, sizes)
    h, ht = _states(x, B, dtp, lcum, h0, chunking, store_final, sizes, prec)
    out = empty(L, H, P, dtype=x.dtype, device=x.device)
    y = empty(L, H, P, dtype=x.dtype, device=x.device) if z is not None else None
    ssd_output_fwd_kernel[(chunking.num_chunks, triton.cdiv(P, sizes["BP"]), H)](
        x, z, B, C, D, dtp, lcum, h, y, out, chunking.chunk_index, chunking.cu_seqlens,
        H=H, G=G, P=P, N=N, BT=CHUNK, BP=sizes["BP"], BNC=sizes["BNC"], PREC=prec,
        HAS_D=D is not None, HAS_Z=z is not None, STORE_Y=z is not None,
    )
    return out, ht, dtp, lcum, y


def chunk_ssd_bwd(x, dt, A, B, C, D, dt_bias, h0, dtp, lcum, cfg: DtConfig, chunking: Chunking, dy, dht,
                  need_dh0: bool):
    """Chunked backward from dy, the gradient of the ungated output. Returns dx, ddt (inputs' dtypes),
    dA, dB, dC, dD, ddt_bias (float32, the caller casts) and dh0 (float32) or None."""
    L, H, P = x.shape
    G, N = B.shape[1:]
    sizes, prec = block_sizes(P, N, H), dot_precision(x.dtype)
    Nseq, NC = chunking.num_sequences, chunking.num_chunks
    idx, cu = chunking.chunk_index, chunking.cu_seqlens
    dev = x.device
    h, _ = _states(x, B, dtp, lcum, h0, chunking, False, sizes, prec)
    dh = empty(NC, H, P, N, dtype=x.dtype, device=dev)
    dh0 = empty(Nseq, H, P, N, dtype=torch.float32, device=dev) if need_dh0 else None
    ssd_state_bwd_kernel[lambda meta: (Nseq * H, triton.cdiv(P, meta["BP"]))](
        C, dy, lcum, dh, dht, dh0, chunking.chunk_offsets, cu,
        H=H, G=G, P=P, N=N, BT=CHUNK, BN=sizes["BN"], PREC=prec, HAS_DHT=dht is not None, STORE_DH0=need_dh0,
    )
    n_p = triton.cdiv(P, sizes["BP"])
    dx = empty(L, H, P, dtype=x.dtype, device=dev)
    ddt_part = empty(n_p, L, H, dtype=torch.float32, device=dev)
    dl_part = empty(n_p, L, H, dtype=torch.float32, device=dev)
    dd_part = empty(n_p, NC, H, dtype=torch.float32, device=dev) if D is not None else None
    ssd_dx_bwd_kernel[(NC, n_p, H)](
        x, B, C, D, dtp, lcum, h, dh, dy, dx, ddt_part, dl_part, dd_part, idx, cu, L * H,
        H=H, G=G, P=P, N=N, BT=CHUNK, BP=sizes["BP"], BNC=sizes["BNC"], PREC=prec, HAS_D=D is not None,
    )
    db_heads = empty(L, H, N, dtype=torch.float32, device=dev)
    dc_heads = empty(L, H, N, dtype=torch.float32, device=dev)
    ssd_dbc_bwd_kernel[(NC, triton.cdiv(N, sizes["BNC"]), H)](
        x, B, C, dtp, lcum, h, dh, dy, db_heads, dc_heads, idx, cu,
        H=H, G=G, P=P, N=N, BT=CHUNK, BPC=sizes["BPC"], BNC=sizes["BNC"], PREC=prec,
    )
    ddt = empty(L, H, dtype=torch.float32, device=dev)
    da_part = empty(NC, H, dtype=torch.float32, device=dev)
    ssd_dt_bwd_kernel[(NC, triton.cdiv(H, sizes["BH"]))](
        dt, dt_bias, A, dtp, ddt_part.sum(0), dl_part.sum(0), ddt, da_part, idx, cu, cfg.lo, cfg.hi,
        H=H, BT=CHUNK, BH=sizes["BH"], HAS_BIAS=dt_bias is not None, SOFTPLUS=cfg.softplus,
    )
    db = db_heads.view(L, G, H // G, N).sum(2)
    dc = dc_heads.view(L, G, H // G, N).sum(2)
    dd = None if D is None else dd_part.sum((0, 1))
    ddt_bias = None if dt_bias is None else ddt.sum(0)
    return dx, ddt.to(dt.dtype), da_part.sum(0), db, dc, dd, ddt_bias, dh0


def recurrent_ssd_fwd(x, dt, A, B, C, D, z, dt_bias, h0, cfg: DtConfig, cu_seqlens: torch.Tensor,
                      store_final: bool):
    """Token-by-token forward (no backward): decoding and short prefills. Returns (out, final state or None)."""
    L, H, P = x.shape
    G, N = B.shape[1:]
    Nseq = cu_seqlens.numel() - 1
    out = empty(L, H, P, dtype=x.dtype, device=x.device)
    ht = empty(Nseq, H, P, N, dtype=torch.float32, device=x.device) if store_final else None
    ssd_recurrent_fwd_kernel[lambda meta: (Nseq * H, triton.cdiv(P, meta["BP"]))](
        x, dt, A, B, C, D, z, dt_bias, out, h0, ht, cu_seqlens, cfg.lo, cfg.hi,
        H=H, G=G, P=P, N=N, BN=head_block(N), HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=cfg.softplus, HAS_H0=h0 is not None, STORE_HT=store_final,
    )
    return out, ht
