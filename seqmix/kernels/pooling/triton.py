"""Triton kernels of the segment ops, forward and backward, O(L*D) work.

Pooling and the upsampling backward need running sums inside segments that may span
many tiles, so their programs own one sequence and one block of channels and walk the
sequence tile by tile (forwards for pooling, backwards for the upsampling gradient),
carrying the open segment's sum across tiles; inside a tile the segmented sum is one
``tl.associative_scan``. The upsampling forward is a gather and runs one program per
tile. Every output row is written by exactly one program: no atomics, deterministic.
The boundary gradients follow docs/math/pooling.md, as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmix.kernels.alloc import empty
from seqmix.kernels.sequences import chunking_for
from seqmix.kernels.triton_common import load_rows, sequence_bounds, store_rows

BT = 64  # tokens per tile
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported(dtype: torch.dtype) -> str | None:
    return None if dtype in FLOAT_DTYPES else f"the Triton kernels take {FLOAT_DTYPES}, got {dtype}"


def _block(D: int) -> int:
    return min(64, triton.next_power_of_2(max(D, 1)))


@triton.jit
def _segmented_add(acc, acc_reset, v, v_reset):
    """Combine of a segmented sum: an element that resets (a run's first element in a forward
    scan, its last in a reverse one) drops everything accumulated before it."""
    return tl.where(v_reset, v, acc + v), acc_reset | v_reset


@triton.jit
def _running_segment_sums(b_x, reset, carry_x, carry_n, BT: tl.constexpr, BD: tl.constexpr):
    """Sum ``r`` [BT, BD] and count ``n`` [BT] of each token's segment up to the token, where
    ``reset`` marks the tokens that start a segment and the carries continue the open one."""
    r, _ = tl.associative_scan((b_x, tl.broadcast_to(reset[:, None], (BT, BD))), 0, _segmented_add)
    n, _ = tl.associative_scan((tl.full((BT,), 1.0, tl.float32), reset), 0, _segmented_add)
    continues = tl.cumsum(reset.to(tl.int32), 0) == 0
    r += tl.where(continues[:, None], carry_x[None, :], 0.0)
    n += tl.where(continues, carry_n, 0.0)
    return r, n


@triton.jit
def _reverse_run_sums(g, ends, carry, starts, BT: tl.constexpr, BD: tl.constexpr):
    """Sums of g [BT, BD] from each token to the end of its run (``ends`` marks a run's last token),
    the run continuing into the next tile adding ``carry``; also the carry for the previous tile
    (the first token's sum, unless a run starts there)."""
    G, _ = tl.associative_scan((g, tl.broadcast_to(ends[:, None], (BT, BD))), 0, _segmented_add, reverse=True)
    continues = tl.cumsum(ends.to(tl.int32), 0, reverse=True) == 0
    G += tl.where(continues[:, None], carry[None, :], 0.0)
    first = (tl.arange(0, BT) == 0) & ~starts
    return G, tl.sum(tl.where(first[:, None], G, 0.0), 0)


@triton.jit
def _tile_boundaries(bh, c, t, valid, bos):
    """Hard boundary b_t (float32), count c_t (int64) and whether token t starts a segment."""
    b = tl.load(bh + t, mask=valid, other=0.0)
    prev = tl.load(bh + t - 1, mask=valid & (t > bos), other=1.0)
    cnt = tl.load(c + t, mask=valid, other=0).to(tl.int64)
    return b, cnt, prev > 0


@triton.jit
def segment_pool_fwd_kernel(x, bh, c, cu_seqlens, out, counts, S, D: tl.constexpr, BT: tl.constexpr,
                            BD: tl.constexpr):
    """Means of the closed segments of sequence ``program_id(0)``, channels of block ``program_id(1)``."""
    i_n, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    rows = tl.arange(0, BT)
    cols = i_d * BD + tl.arange(0, BD)
    carry_x = tl.zeros([BD], dtype=tl.float32)
    carry_n = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)
    for i in range(0, tl.cdiv(eos - bos, BT)):
        t0 = bos + i * BT
        nt = tl.minimum(eos - t0, BT)
        t = t0 + rows
        valid = rows < nt
        b, cnt, reset = _tile_boundaries(bh, c, t, valid, bos)
        b_x = load_rows(x, t0, nt, D, i_d * BD, D, BT, BD).to(tl.float32)
        r, n = _running_segment_sums(b_x, reset, carry_x, carry_n, BT, BD)
        sigma = cnt - b.to(tl.int64)
        closes = valid & (b > 0) & (sigma < S)
        dst = i_n * S + sigma
        tl.store(out + dst[:, None] * D + cols[None, :], (r / n[:, None]).to(out.dtype.element_ty),
                 mask=closes[:, None] & (cols < D)[None, :])
        tl.store(counts + dst, n, mask=closes & (rows * 0 + i_d == 0))  # one block writes the counts
        # The open segment carries into the next tile unless the tile's last token closed it.
        keep = tl.where(rows == nt - 1, 1.0 - b, 0.0)
        carry_x = tl.sum(r * keep[:, None], 0)
        carry_n = tl.sum(n * keep, 0)


@triton.jit
def segment_pool_bwd_kernel(x, bh, c, cu_seqlens, dpooled, pooled, counts, dx, db_part, S, L,
                            D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """dx, and this channel block's share of d(boundaries) (docs/math/pooling.md, section 2)."""
    i_n, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    rows = tl.arange(0, BT)
    cols = i_d * BD + tl.arange(0, BD)
    cmask = (cols < D)[None, :]
    carry_x = tl.zeros([BD], dtype=tl.float32)
    carry_n = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)
    for i in range(0, tl.cdiv(eos - bos, BT)):
        t0 = bos + i * BT
        nt = tl.minimum(eos - t0, BT)
        t = t0 + rows
        valid = rows < nt
        b, cnt, reset = _tile_boundaries(bh, c, t, valid, bos)
        b_x = load_rows(x, t0, nt, D, i_d * BD, D, BT, BD).to(tl.float32)
        r, n = _running_segment_sums(b_x, reset, carry_x, carry_n, BT, BD)
        # dx: the gradient of the own segment's mean, shared by its tokens.
        own = i_n * S + tl.minimum(cnt - b.to(tl.int64), S - 1)
        own_ok = valid & (cnt - b.to(tl.int64) < S)
        n_own = tl.load(counts + own, mask=own_ok, other=0.0)
        own_ok = own_ok & (n_own > 0)
        g_own = tl.load(dpooled + own[:, None] * D + cols[None, :], mask=own_ok[:, None] & cmask, other=0.0)
        d_x = tl.where(own_ok[:, None], g_own.to(tl.float32) / tl.where(own_ok, n_own, 1.0)[:, None], 0.0)
        store_rows(dx, d_x, t0, nt, D, i_d * BD, D, BT, BD)
        # d b_t: b_t resets the running sum before token t+1, which belongs to segment c_t.
        nxt = i_n * S + tl.minimum(cnt, S - 1)
        nxt_ok = valid & (t < eos - 1) & (cnt < S)
        n_nxt = tl.load(counts + nxt, mask=nxt_ok, other=0.0)
        nxt_ok = nxt_ok & (n_nxt > 0)
        g_nxt = tl.load(dpooled + nxt[:, None] * D + cols[None, :], mask=nxt_ok[:, None] & cmask, other=0.0)
        m_nxt = tl.load(pooled + nxt[:, None] * D + cols[None, :], mask=nxt_ok[:, None] & cmask, other=0.0)
        dot = tl.sum(g_nxt.to(tl.float32) * (r - n[:, None] * m_nxt.to(tl.float32)), 1)
        d_b = tl.where(nxt_ok, -dot / tl.where(nxt_ok, n_nxt, 1.0), 0.0)
        tl.store(db_part + i_d * L + t, d_b, mask=valid)
        keep = tl.where(rows == nt - 1, 1.0 - b, 0.0)
        carry_x = tl.sum(r * keep[:, None], 0)
        carry_n = tl.sum(n * keep, 0)


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
                                BT: tl.constexpr, BD: tl.constexpr):
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
    for i in range(0, n_tiles):
        t0 = bos + (n_tiles - 1 - i) * BT
        nt = tl.minimum(eos - t0, BT)
        t = t0 + rows
        valid = rows < nt
        b = tl.load(bh + t, mask=valid, other=0.0)
        cnt = tl.load(c + t, mask=valid, other=0).to(tl.int64)
        has_next = valid & (t + 1 < eos)
        b_next = tl.load(bh + t + 1, mask=has_next, other=0.0)
        c_next = tl.load(c + t + 1, mask=has_next, other=0).to(tl.int64)
        g = load_rows(dout, t0, nt, D, i_d * BD, D, BT, BD).to(tl.float32)
        # dy: the tokens reading one row form a run that starts at a sequence start or at a boundary
        # that is not clamped to row S; its first token writes the run's sum.
        starts = valid & ((t == bos) | ((b > 0) & (cnt <= S)))
        ends = ~has_next | ((b_next > 0) & (c_next <= S))
        G_row, carry_row = _reverse_run_sums(g, ends, carry_row, starts, BT, BD)
        dst = base + tl.minimum(cnt, S)
        tl.store(dy + dst[:, None] * D + cols[None, :], G_row, mask=starts[:, None] & cmask)
        # d b_t: the gradient of the relaxed output o_t, summed up to the next boundary of any kind.
        G, carry_run = _reverse_run_sums(g, ~has_next | (b_next > 0), carry_run, valid & ((t == bos) | (b > 0)),
                                         BT, BD)
        sigma = cnt - b.to(tl.int64)
        y_next = tl.load(y + (base + tl.minimum(sigma + 1, S))[:, None] * D + cols[None, :],
                         mask=valid[:, None] & cmask, other=0.0).to(tl.float32)
        y_prev = tl.load(y + (base + tl.minimum(sigma, S))[:, None] * D + cols[None, :],
                         mask=valid[:, None] & cmask, other=0.0).to(tl.float32)
        tl.store(db_part + i_d * L + t, tl.sum(G * (y_next - y_prev), 1), mask=valid)


def pool_fwd(x, bh, seg, S: int):
    L, D = x.shape
    BD = _block(D)
    # Rows of missing segments stay zero by contract, so the output starts as zeros.
    pooled = torch.zeros(seg.n * S, D, dtype=x.dtype, device=x.device)
    counts = torch.zeros(seg.n * S, dtype=torch.float32, device=x.device)
    if L and S:
        segment_pool_fwd_kernel[(seg.n, triton.cdiv(D, BD))](x, bh, seg.c, seg.cu, pooled, counts, S, D=D, BT=BT,
                                                            BD=BD)
    return pooled, counts


def pool_bwd(dpooled, x, bh, seg, pooled, counts, S: int):
    L, D = x.shape
    BD = _block(D)
    nd = triton.cdiv(D, BD)
    if S == 0:
        return torch.zeros_like(x), torch.zeros(L, dtype=torch.float32, device=x.device)
    dx = empty(L, D, dtype=x.dtype, device=x.device)
    db = empty(nd, L, dtype=torch.float32, device=x.device)
    segment_pool_bwd_kernel[(seg.n, nd)](x, bh, seg.c, seg.cu, dpooled.contiguous(), pooled, counts, dx, db, S, L,
                                         D=D, BT=BT, BD=BD)
    return dx, db.sum(0)


def upsample_fwd(y, seg, S: int):
    L, D = seg.c.numel(), y.shape[1]
    BD = _block(D)
    out = empty(L, D, dtype=y.dtype, device=y.device)
    chunking = chunking_for(1, L, BT, y.device, seg.cu) if seg.packed else chunking_for(seg.n, L // seg.n, BT,
                                                                                          y.device)
    segment_upsample_fwd_kernel[(chunking.num_chunks, triton.cdiv(D, BD))](
        y, seg.c, chunking.chunk_index, chunking.cu_seqlens, out, S, D=D, BT=BT, BD=BD)
    return out


def upsample_bwd(dout, y, bh, seg, S: int):
    L, D = dout.shape
    BD = _block(D)
    nd = triton.cdiv(D, BD)
    # Rows of y that no token reads get no gradient: zeros, not poison.
    dy = torch.zeros(y.shape[0], D, dtype=torch.float32, device=y.device)
    db = empty(nd, L, dtype=torch.float32, device=y.device)
    segment_upsample_bwd_kernel[(seg.n, nd)](y, bh, seg.c, seg.cu, dout.contiguous(), dy, db, S, L, D=D, BT=BT,
                                             BD=BD)
    return dy.to(y.dtype), db.sum(0)
