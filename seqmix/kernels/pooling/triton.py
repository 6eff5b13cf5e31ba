"""Triton kernels of the segment ops, forward and backward, O(L*D) work.

Pooling and the upsampling backward need running sums inside segments that may span
many tiles, so their programs own one sequence and one block of channels and walk the
sequence tile by tile (forwards for pooling, backwards for the upsampling gradient),
carrying the open segment's sum across tiles; inside a tile of 64 tokens the segmented
running sum is one matmul with a 0/1 "same segment, not later" matrix. The upsampling
forward is a gather and runs one program per tile. Every output row is written by exactly
one program: no atomics, deterministic. The boundary gradients follow docs/math/pooling.md,
as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmix.kernels.alloc import empty
from seqmix.kernels.sequences import chunking_for
from seqmix.kernels.triton_common import dot_precision, head_block, load_rows, sequence_bounds, store_rows

BT = 64  # tokens per tile
# 32 channels and 8 warps per program: compiled for sm_90 (tests/kernels/pooling/test_sm90_compile.py) the
# kernels then keep their [64, 64] tiles in registers; 64 channels or 4 warps spilled kilobytes to the stack
# in float32 (whose ieee dots do not run on the tensor cores).
NUM_WARPS = 8


def _block(D: int, dtype: torch.dtype) -> int:
    """Channels per program: at least 16 (``tl.dot``'s minimum), at most 32; 16 in float32, where the upsample
    backward (two [64, 64] run matrices and a [64, 32] dot each) spilled 20 B at 32 on sm_90."""
    return 16 if dtype == torch.float32 else min(32, head_block(D))


@triton.jit
def same_run_matrix(run, valid, rows, BACKWARD: tl.constexpr):
    """[BT, BT] 0/1 matrix M with M[t, l] = 1 when token l is in token t's run (equal ``run`` ids) and
    at or before t (at or after t when BACKWARD), l a valid token. ``M @ x`` is the segmented running
    sum of x inside the tile, on the tensor cores."""
    order = (rows[None, :] >= rows[:, None]) if BACKWARD else (rows[None, :] <= rows[:, None])
    return ((run[:, None] == run[None, :]) & order & valid[None, :]).to(tl.float32)


@triton.jit
def segment_running_sums(x, bh, t0, nt, bos, carry_x, carry_n, i_d, D: tl.constexpr, BT: tl.constexpr,
                         BD: tl.constexpr, PREC: tl.constexpr):
    """For the tile of tokens t0 .. t0+nt-1: r [BT, BD], the sum of x over each token's segment up to and
    including the token, and n [BT], its token count; the segment left open by the previous tile continues
    from (carry_x, carry_n)."""
    rows = tl.arange(0, BT)
    t = t0 + rows
    valid = rows < nt
    # token t starts a segment when t-1 was a boundary (or t opens the sequence)
    run = tl.cumsum((tl.load(bh + t - 1, mask=valid & (t > bos), other=1.0) > 0).to(tl.int32), 0)
    same = same_run_matrix(run, valid, rows, False)
    b_x = load_rows(x, t0, nt, D, i_d * BD, D, BT, BD)
    r = tl.dot(same.to(b_x.dtype), b_x, input_precision=PREC) + tl.where(run == 0, 1.0, 0.0)[:, None] * carry_x
    n = tl.sum(same, 1) + tl.where(run == 0, carry_n, 0.0)
    return r, n


@triton.jit
def open_segment_carry(r, n, b, rows, nt):
    """The open segment's (sum, count) that carries into the next tile: none if the tile's last token closed it."""
    keep = tl.where(rows == nt - 1, 1.0 - b, 0.0)
    return tl.sum(r * keep[:, None], 0), tl.sum(n * keep, 0)


@triton.jit
def segment_pool_fwd_kernel(x, bh, c, cu_seqlens, out, counts, S, D: tl.constexpr, BT: tl.constexpr,
                            BD: tl.constexpr, PREC: tl.constexpr):
    """Means of the closed segments of sequence ``program_id(0)``, channels of block ``program_id(1)``."""
    i_n, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    rows = tl.arange(0, BT)
    cols = i_d * BD + tl.arange(0, BD)
    carry_x = tl.zeros([BD], dtype=tl.float32)
    carry_n = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)
    for i in range(tl.cdiv(eos - bos, BT)):
        t0 = bos + i * BT
        nt = tl.minimum(eos - t0, BT)
        t = t0 + rows
        valid = rows < nt
        b = tl.load(bh + t, mask=valid, other=0.0)
        r, n = segment_running_sums(x, bh, t0, nt, bos, carry_x, carry_n, i_d, D, BT, BD, PREC)
        sigma = tl.load(c + t, mask=valid, other=0).to(tl.int64) - b.to(tl.int64)
        closes = valid & (b > 0) & (sigma < S)
        dst = i_n * S + sigma
        tl.store(out + dst[:, None] * D + cols[None, :], (r / tl.maximum(n, 1.0)[:, None]).to(out.dtype.element_ty),
                 mask=closes[:, None] & (cols < D)[None, :])
        tl.store(counts + dst, n, mask=closes & (rows * 0 + i_d == 0))  # one channel block writes the counts
        carry_x, carry_n = open_segment_carry(r, n, b, rows, nt)


@triton.jit
def segment_pool_bwd_kernel(x, bh, c, cu_seqlens, dpooled, pooled, counts, dx, db_part, S, L,
                            D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """dx, and this channel block's share of d(boundaries) (docs/math/pooling.md, section 2)."""
    i_n, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    rows = tl.arange(0, BT)
    cols = i_d * BD + tl.arange(0, BD)
    cmask = (cols < D)[None, :]
    carry_x = tl.zeros([BD], dtype=tl.float32)
    carry_n = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)
    for i in range(tl.cdiv(eos - bos, BT)):
        t0 = bos + i * BT
        nt = tl.minimum(eos - t0, BT)
        t = t0 + rows
        valid = rows < nt
        b = tl.load(bh + t, mask=valid, other=0.0)
        r, n = segment_running_sums(x, bh, t0, nt, bos, carry_x, carry_n, i_d, D, BT, BD, PREC)
        cnt = tl.load(c + t, mask=valid, other=0).to(tl.int64)
        # dx: the gradient of the own segment's mean, shared by its tokens.
        sigma = cnt - b.to(tl.int64)
        own = i_n * S + tl.minimum(sigma, S - 1)
        n_own = tl.load(counts + own, mask=valid & (sigma < S), other=0.0)
        own_ok = n_own > 0
        g_own = tl.load(dpooled + own[:, None] * D + cols[None, :], mask=own_ok[:, None] & cmask, other=0.0)
        store_rows(dx, g_own.to(tl.float32) / tl.where(own_ok, n_own, 1.0)[:, None], t0, nt, D, i_d * BD, D, BT, BD)
        # d b_t: b_t resets the running sum before token t+1, which belongs to segment c_t.
        nxt = i_n * S + tl.minimum(cnt, S - 1)
        n_nxt = tl.load(counts + nxt, mask=valid & (t < eos - 1) & (cnt < S), other=0.0)
        nxt_ok = n_nxt > 0
        g_nxt = tl.load(dpooled + nxt[:, None] * D + cols[None, :], mask=nxt_ok[:, None] & cmask, other=0.0)
        m_nxt = tl.load(pooled + nxt[:, None] * D + cols[None, :], mask=nxt_ok[:, None] & cmask, other=0.0)
        dot = tl.sum(g_nxt.to(tl.float32) * (r - n[:, None] * m_nxt.to(tl.float32)), 1)
        tl.store(db_part + i_d * L + t, -dot / tl.where(nxt_ok, n_nxt, 1.0), mask=valid)
        carry_x, carry_n = open_segment_carry(r, n, b, rows, nt)


@triton.jit
def segment_upsample_fwd_kernel(y, c, chunk_index, cu_seqlens, out, S, D: tl.constexpr, BT: tl.constexpr,
                                BD: tl.constexpr):
    """out[t] = y[seq(t), min(c_t, S)] for the tokens of one tile and one channel block."""
    i_c, i_d = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_index + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_index + i_c * 2 + 1).to(tl.int64)
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    t0 = bos + i_t * BT
    nt = tl.minimum(eos - t0, BT)
    rows = tl.arange(0, BT)
    cols = i_d * BD + tl.arange(0, BD)
    valid = rows < nt
    cnt = tl.load(c + t0 + rows, mask=valid, other=0).to(tl.int64)
    src = i_n * (S + 1) + tl.minimum(cnt, S)
    v = tl.load(y + src[:, None] * D + cols[None, :], mask=valid[:, None] & (cols < D)[None, :], other=0.0)
    store_rows(out, v, t0, nt, D, i_d * BD, D, BT, BD)


@triton.jit
def segment_upsample_bwd_kernel(y, bh, c, cu_seqlens, dout, dy, db_part, S, L, D: tl.constexpr,
                                BT: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """dy (each read row gets the sum over its run of tokens) and this channel block's share of
    d(boundaries) (docs/math/pooling.md, section 3), walking the sequence's tiles backwards."""
    i_n, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    rows = tl.arange(0, BT)
    cols = i_d * BD + tl.arange(0, BD)
    cmask = (cols < D)[None, :]
    base = i_n * (S + 1)
    carry_row = tl.zeros([BD], dtype=tl.float32)
    carry_run = tl.zeros([BD], dtype=tl.float32)
    n_tiles = tl.cdiv(eos - bos, BT)
    for i in range(n_tiles):
        t0 = bos + (n_tiles - 1 - i) * BT
        nt = tl.minimum(eos - t0, BT)
        t = t0 + rows
        valid = rows < nt
        b = tl.load(bh + t, mask=valid, other=0.0)
        cnt = tl.load(c + t, mask=valid, other=0).to(tl.int64)
        g = load_rows(dout, t0, nt, D, i_d * BD, D, BT, BD)
        # dy: the tokens reading one row form a run that starts at a sequence start or at a boundary
        # not clamped to row S; the run's first token writes the run's sum.
        starts = valid & ((t == bos) | ((b > 0) & (cnt <= S)))
        run = tl.cumsum(starts.to(tl.int32), 0)
        last_run = run == tl.max(tl.where(valid, run, 0), 0)
        G_row = tl.dot(same_run_matrix(run, valid, rows, True).to(g.dtype), g, input_precision=PREC)
        G_row += tl.where(last_run, 1.0, 0.0)[:, None] * carry_row
        tl.store(dy + (base + tl.minimum(cnt, S))[:, None] * D + cols[None, :], G_row, mask=starts[:, None] & cmask)
        carry_row = tl.sum(tl.where(((rows == 0) & ~starts)[:, None], G_row, 0.0), 0)
        # d b_t: the gradient of the relaxed output o_t, summed up to the next boundary of any kind.
        resets = valid & ((t == bos) | (b > 0))
        run = tl.cumsum(resets.to(tl.int32), 0)
        last_run = run == tl.max(tl.where(valid, run, 0), 0)
        G = tl.dot(same_run_matrix(run, valid, rows, True).to(g.dtype), g, input_precision=PREC)
        G += tl.where(last_run, 1.0, 0.0)[:, None] * carry_run
        carry_run = tl.sum(tl.where(((rows == 0) & ~resets)[:, None], G, 0.0), 0)
        sigma = cnt - b.to(tl.int64)
        y_next = tl.load(y + (base + tl.minimum(sigma + 1, S))[:, None] * D + cols[None, :],
                         mask=valid[:, None] & cmask, other=0.0).to(tl.float32)
        y_prev = tl.load(y + (base + tl.minimum(sigma, S))[:, None] * D + cols[None, :],
                         mask=valid[:, None] & cmask, other=0.0).to(tl.float32)
        tl.store(db_part + i_d * L + t, tl.sum(G * (y_next - y_prev), 1), mask=valid)


def pool_fwd(x, bh, seg, S: int):
    L, D = x.shape
    BD = _block(D, x.dtype)
    # Rows of missing segments stay zero by contract, so the output starts as zeros.
    pooled = torch.zeros(seg.n * S, D, dtype=x.dtype, device=x.device)
    counts = torch.zeros(seg.n * S, dtype=torch.float32, device=x.device)
    if L and S:
        segment_pool_fwd_kernel[(seg.n, triton.cdiv(D, BD))](x, bh, seg.c, seg.cu, pooled, counts, S, D=D, BT=BT,
                                                            BD=BD, PREC=dot_precision(x.dtype), num_warps=NUM_WARPS)
    return pooled, counts


def pool_bwd(dpooled, x, bh, seg, pooled, counts, S: int):
    L, D = x.shape
    BD = _block(D, x.dtype)
    nd = triton.cdiv(D, BD)
    if S == 0:
        return torch.zeros_like(x), torch.zeros(L, dtype=torch.float32, device=x.device)
    dx = empty(L, D, dtype=x.dtype, device=x.device)
    db = empty(nd, L, dtype=torch.float32, device=x.device)
    segment_pool_bwd_kernel[(seg.n, nd)](x, bh, seg.c, seg.cu, dpooled.contiguous(), pooled, counts, dx, db, S, L,
                                         D=D, BT=BT, BD=BD, PREC=dot_precision(x.dtype), num_warps=NUM_WARPS)
    return dx, db.sum(0)


def upsample_fwd(y, seg, S: int):
    L, D = seg.c.numel(), y.shape[1]
    BD = _block(D, y.dtype)
    out = empty(L, D, dtype=y.dtype, device=y.device)
    chunking = chunking_for(1, L, BT, y.device, seg.cu) if seg.packed else chunking_for(seg.n, L // seg.n, BT,
                                                                                          y.device)
    segment_upsample_fwd_kernel[(chunking.num_chunks, triton.cdiv(D, BD))](
        y, seg.c, chunking.chunk_index, chunking.cu_seqlens, out, S, D=D, BT=BT, BD=BD, num_warps=NUM_WARPS)
    return out


def upsample_bwd(dout, y, bh, seg, S: int):
    L, D = dout.shape
    BD = _block(D, dout.dtype)
    nd = triton.cdiv(D, BD)
    # Rows of y that no token reads get no gradient: zeros, not poison.
    dy = torch.zeros(y.shape[0], D, dtype=torch.float32, device=y.device)
    db = empty(nd, L, dtype=torch.float32, device=y.device)
    segment_upsample_bwd_kernel[(seg.n, nd)](y, bh, seg.c, seg.cu, dout.contiguous(), dy, db, S, L, D=D, BT=BT,
                                             BD=BD, PREC=dot_precision(dout.dtype), num_warps=NUM_WARPS)
    return dy.to(y.dtype), db.sum(0)


KERNELS = (segment_pool_fwd_kernel, segment_pool_bwd_kernel, segment_upsample_fwd_kernel, segment_upsample_bwd_kernel)
