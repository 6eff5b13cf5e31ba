"""PyTorch reference of the segment ops: forward and the relaxed-boundary backward, O(L*D).

Everything works on packed tokens: ``x`` [L, D], the hard boundaries ``bh`` [L] (0./1.) and
``seg`` (:class:`seqmix.kernels.pooling.Segments`: ``c`` [L] int64, the boundaries up to and
including each token counted within its sequence, and ``seq`` [L] int64, each token's
sequence). Segment ``s`` of sequence ``n`` is row ``n * S + s`` of the pooled output; the
upsampling input has ``S + 1`` rows per sequence.
No ``[L, S]`` matrix is ever formed: pooling is an accumulating ``index_put_`` and upsampling a gather.
The gradients with respect to the boundaries are derived in docs/math/pooling.md; the
Triton kernels compute the same formulas.
"""

from __future__ import annotations

import torch

from seqmix.kernels.library import forward_outputs
from seqmix.kernels.sequences import reference_dtype


def _positions(L: int, device) -> torch.Tensor:
    return torch.arange(L, device=device)


def _cumsum_rows(t: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Cumulative sum of [L, D] over its rows, in blocks of ``block`` rows plus the blocks' running totals:
    on the CPU torch's cumsum over dim 0 of a wide matrix ran 4x slower than over a middle dim."""
    L, D = t.shape
    blocks = torch.nn.functional.pad(t, (0, 0, 0, (-L) % block)).view(-1, block, D).cumsum(1)
    totals = blocks[:, -1]
    return (blocks + (totals.cumsum(0) - totals)[:, None]).view(-1, D)[:L]


def _segment_start(is_start: torch.Tensor) -> torch.Tensor:
    """Index of the last position at or before each token where ``is_start`` holds."""
    pos = _positions(is_start.numel(), is_start.device)
    return torch.cummax(torch.where(is_start, pos, torch.zeros_like(pos)), 0).values


def _next_start(is_start: torch.Tensor) -> torch.Tensor:
    """Index of the first position strictly after each token where ``is_start`` holds (L if none)."""
    L = is_start.numel()
    pos = _positions(L, is_start.device)
    idx = torch.where(is_start, pos, torch.full_like(pos, L))
    after = torch.cat([idx[1:], idx.new_full((1,), L)])
    return torch.flip(torch.cummin(torch.flip(after, [0]), 0).values, [0])


def _sequence_starts(seq: torch.Tensor) -> torch.Tensor:
    """True at the first token of every sequence."""
    first = torch.ones_like(seq, dtype=torch.bool)
    first[1:] = seq[1:] != seq[:-1]
    return first


def pool_fwd(x, bh, seg, S: int):
    """Means of the closed segments: ``pooled`` [N*S, D] (rows without a segment are zero) and
    ``counts`` [N*S] (tokens per segment, float32/float64, 0 for a missing segment)."""
    L, D = x.shape
    c, seq, N = seg.c, seg.seq, seg.n
    sigma = c - bh.long()  # the segment each token belongs to
    total = torch.zeros(N, dtype=torch.int64, device=x.device).scatter_reduce_(0, seq, c, "amax")
    keep = (sigma < S) & (sigma < total[seq])  # kept (max_segments) and closed (not the trailing one)
    row = torch.where(keep, seq * S + sigma, torch.zeros_like(sigma))
    w = keep.to(x.dtype)
    # index_put_ with accumulate: on the CPU several times faster than index_add_ for these shapes
    sums = x.new_zeros(N * S, D).index_put_((row,), x * w[:, None], accumulate=True)
    counts = x.new_zeros(N * S).index_put_((row,), w, accumulate=True)
    return sums / counts.clamp_min(1)[:, None], counts


def pool_bwd(dpooled, x, bh, seg, pooled, counts, S: int):
    """dx [L, D] and d(boundaries) [L] of :func:`pool_fwd` (docs/math/pooling.md, section 2)."""
    L, D = x.shape
    if S == 0:
        return torch.zeros_like(x), x.new_zeros(L)
    c, seq = seg.c, seg.seq
    sigma = c - bh.long()
    inv = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
    own = seq * S + sigma.clamp_max(S - 1)
    own_ok = (sigma < S) & (counts[own] > 0)
    dx = torch.where(own_ok[:, None], dpooled[own] * inv[own][:, None], torch.zeros_like(x))
    # b_t resets the running sum before token t+1, which belongs to segment s' = c_t.
    last = torch.ones_like(seq, dtype=torch.bool)
    last[:-1] = seq[1:] != seq[:-1]
    nxt = seq * S + c.clamp_max(S - 1)
    nxt_ok = ~last & (c < S) & (counts[nxt] > 0)
    # Running sum and count of the token's own segment up to the token, as deviations from that
    # segment's mean (bounded, no cancellation of long prefix sums inside closed segments).
    is_start = _sequence_starts(seq)
    is_start[1:] |= bh[:-1] > 0
    start = _segment_start(is_start)
    m_own = torch.where(own_ok[:, None], pooled[own], torch.zeros_like(x))
    dev = _cumsum_rows(x - m_own)
    dev = dev - (dev[start] - (x - m_own)[start])
    n_run = (_positions(L, x.device) - start + 1).to(x.dtype)
    term = dev + n_run[:, None] * (m_own - pooled[nxt])
    db = -(dpooled[nxt] * term).sum(1) * inv[nxt]
    return dx, torch.where(nxt_ok, db, torch.zeros_like(db))


def upsample_fwd(y, seg, S: int):
    """Token t reads row ``min(c_t, S)`` of its sequence's ``S + 1`` rows of y [N*(S+1), D]."""
    return y[seg.seq * (S + 1) + seg.c.clamp_max(S)]


def upsample_bwd(dout, y, bh, seg, S: int):
    """dy [N*(S+1), D] and d(boundaries) [L] of :func:`upsample_fwd` (docs/math/pooling.md, section 3)."""
    L, D = dout.shape
    c, seq = seg.c, seg.seq
    row = seq * (S + 1) + c.clamp_max(S)
    dy = dout.new_zeros(y.shape[0], D).index_put_((row,), dout, accumulate=True)
    # G_t: the gradient of the relaxed output o_t, the sum of dout from t up to the next boundary
    # (every boundary resets o, a clamped one to row S).
    is_start = _sequence_starts(seq) | (bh > 0)
    rev = torch.flip(_cumsum_rows(torch.flip(dout, [0])), [0])
    rev = torch.cat([rev, rev.new_zeros(1, D)])
    G = rev[:L] - rev[_next_start(is_start)]
    sigma = c - bh.long()
    base = seq * (S + 1)
    diff = y[base + (sigma + 1).clamp_max(S)] - y[base + sigma.clamp_max(S)]
    return dy, (G * diff).sum(1)


class _SegmentPool(torch.autograd.Function):
    """:func:`pool_fwd` in the reference dtype, with the relaxed backward :func:`pool_bwd`."""

    @staticmethod
    def forward(ctx, x, boundaries, bh, seg, S):
        xc = x.to(reference_dtype(x))
        pooled, counts = pool_fwd(xc, bh, seg, S)
        ctx.save_for_backward(xc, bh, pooled, counts)
        ctx.seg, ctx.S = seg, S
        ctx.dtypes = (x.dtype, boundaries.dtype)
        return forward_outputs(pooled.to(x.dtype))

    @staticmethod
    def backward(ctx, dpooled):
        x, bh, pooled, counts = ctx.saved_tensors
        dx, db = pool_bwd(dpooled.to(pooled.dtype), x, bh, ctx.seg, pooled, counts, ctx.S)
        return dx.to(ctx.dtypes[0]), db.to(ctx.dtypes[1]), None, None, None


class _SegmentUpsample(torch.autograd.Function):
    """:func:`upsample_fwd` in the reference dtype, with the relaxed backward :func:`upsample_bwd`."""

    @staticmethod
    def forward(ctx, y, boundaries, bh, seg, S):
        yc = y.to(reference_dtype(y))
        ctx.save_for_backward(yc, bh)
        ctx.seg, ctx.S = seg, S
        ctx.dtypes = (y.dtype, boundaries.dtype)
        return forward_outputs(upsample_fwd(yc, seg, S).to(y.dtype))

    @staticmethod
    def backward(ctx, dout):
        y, bh = ctx.saved_tensors
        dy, db = upsample_bwd(dout.to(y.dtype), y, bh, ctx.seg, ctx.S)
        return dy.to(ctx.dtypes[0]), db.to(ctx.dtypes[1]), None, None, None


def segment_pool(x, boundaries, bh, seg, S: int):
    """Pooled [N*S, D] of x [L, D] in x's dtype; gradients into x and ``boundaries`` [L]."""
    return _SegmentPool.apply(x, boundaries, bh, seg, S)


def segment_upsample(y, boundaries, bh, seg, S: int):
    """[L, D] rows of y [N*(S+1), D] in y's dtype; gradients into y and ``boundaries`` [L]."""
    return _SegmentUpsample.apply(y, boundaries, bh, seg, S)
