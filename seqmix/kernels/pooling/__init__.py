"""Dynamic token pooling: segment mean-pooling and causal upsampling (Nawrot et al. 2023), and
H-Net's dynamic chunking (chunk = the boundary tokens, de-chunk = an EMA computed with ``ssd``).

Conventions (the op contract of docs/design.md, "Dynamic token pooling"): boundaries are [B, T]
floats in [0, 1], a token is a boundary when its value is above 0.5. For pooling a boundary
token closes its own segment (token t is in segment ``sum_{j<t} b_j``), the trailing unclosed
segment is dropped; for upsampling token t reads row ``sum_{j<=t} b_j`` of ``y`` (row 0 is the
layer's null vector). The gradient reaches the boundaries through the relaxed formulation of
docs/math/pooling.md, the same formula in both backends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from seqmix.kernels import triton_limits
from seqmix.kernels.backend import LazyModule, select_backend
from seqmix.kernels.checks import check_cu_seqlens, check_tensor, check_values
from seqmix.kernels.library import custom_op
from seqmix.kernels.op import as_input_grads, grads_like, nothing, register_autograd
from seqmix.kernels.pooling import reference
from seqmix.kernels.sequences import reference_dtype

__all__ = ["Segments", "chunk_select", "ema_dechunk", "hard_boundaries", "segment_pool", "segment_upsample",
           "segments_of"]

kernels = LazyModule("seqmix.kernels.pooling.triton")

IMPLEMENTED = ("triton", "reference")


@dataclass(frozen=True)
class Segments:
    """Where each packed token sits: ``c`` [L] int64 (hard boundaries up to and including the token,
    counted within its sequence), ``seq`` [L] int64 (its sequence), ``cu`` [N+1] int64 (sequence
    bounds), ``n`` sequences, ``packed`` when they came as ``cu_seqlens``."""

    c: torch.Tensor
    seq: torch.Tensor
    cu: torch.Tensor
    n: int
    packed: bool


def segments_of(bh: torch.Tensor, B: int, T: int, n: int, cu_seqlens) -> Segments:
    """Counts and sequence ids of the hard boundaries ``bh`` [B, T] (bool or 0/1) of ``n`` sequences,
    dense or packed with ``cu_seqlens``; built without a host sync."""
    device = bh.device
    counts = bh.long()
    if cu_seqlens is None:
        seq = torch.arange(B, device=device)[:, None].expand(B, T).reshape(-1)
        cu = torch.arange(B + 1, device=device) * T
        return Segments(counts.cumsum(1).reshape(-1), seq, cu, n, False)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    flat = counts.reshape(-1)
    seq = torch.searchsorted(cu[1:], torch.arange(T, device=device), right=True)
    total = flat.cumsum(0)
    before = torch.cat([total.new_zeros(1), total])[cu[:-1]]  # boundaries before each sequence
    return Segments(total - before[seq], seq, cu, n, True)


def _check_boundaries(boundaries, B: int, T: int, like: torch.Tensor) -> None:
    check_tensor("boundaries", boundaries, (B, T), dims="[B, T]", like=like)
    if boundaries.numel():
        inside = (boundaries >= 0) & (boundaries <= 1)
        check_values(inside.all(), "boundaries must lie in [0, 1] (1 marks a boundary)",
                     lambda: boundaries[~inside].flatten()[0].item())


def _check_max_segments(max_segments) -> None:
    if max_segments is None:
        return
    if isinstance(max_segments, bool) or not isinstance(max_segments, int) or max_segments < 1:
        raise ValueError(f"max_segments must be a positive integer or None, got {max_segments!r}")


def _sequences(t: torch.Tensor, B: int, T: int, cu_seqlens) -> int:
    return B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, batch=B, total=T, like=t)


def _fused(op: str, backend, name: str, t: torch.Tensor) -> bool:
    limits = {"triton": triton_limits.unsupported(name, t.dtype)}
    return select_backend(op, backend, t.device, IMPLEMENTED, limits) == "triton"


# The Triton kernels as torch.library ops (autograd through seqmix/kernels/op.py; no state, so the
# "final state" is an empty tensor): x [L, D] and boundaries [L] packed, c / seq [L] and cu [N+1] the
# int64 fields of Segments, y [N*(S+1), D]. The hard boundaries are recomputed from boundaries.

def _segments(c: Tensor, seq: Tensor, cu: Tensor, packed: bool) -> Segments:
    return Segments(c, seq, cu, cu.shape[0] - 1, packed)


def hard_boundaries(boundaries: Tensor) -> Tensor:
    """The boundaries as the ops count them: 1.0 where a value is above 0.5, else 0.0 (same shape)."""
    return (boundaries > 0.5).float()


@custom_op("seqmix::segment_pool_fwd", mutates_args=())
def _pool_fwd(x: Tensor, boundaries: Tensor, c: Tensor, seq: Tensor, cu: Tensor, S: int
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (pooled [N*S, D], no state, and for the backward the tokens per segment [N*S] float32)."""
    pooled, counts = kernels.pool_fwd(x, hard_boundaries(boundaries), _segments(c, seq, cu, False), S)
    return pooled, nothing(x), counts


@_pool_fwd.register_fake
def _(x, boundaries, c, seq, cu, S):
    rows = (cu.shape[0] - 1) * S
    return x.new_empty((rows, x.shape[1])), nothing(x), x.new_empty((rows,), dtype=torch.float32)


@custom_op("seqmix::segment_pool_bwd", mutates_args=())
def _pool_bwd(x: Tensor, boundaries: Tensor, c: Tensor, seq: Tensor, cu: Tensor, pooled: Tensor, counts: Tensor,
              S: int, dpooled: Tensor, dfinal: Tensor | None, needs: list[bool]) -> list[Tensor]:
    seg = _segments(c, seq, cu, False)
    dx, db = kernels.pool_bwd(dpooled, x, hard_boundaries(boundaries), seg, pooled, counts, S)
    return as_input_grads((dx, db, None, None, None), (x, boundaries, c, seq, cu), needs, x)


_pool_bwd.register_fake(lambda *args: grads_like(args[:5], args[-1], args[0]))
register_autograd(_pool_fwd, _pool_bwd, num_inputs=5,
                  saved=lambda inputs, output: (*inputs[:5], output[0], output[2]))


@custom_op("seqmix::segment_upsample_fwd", mutates_args=())
def _upsample_fwd(y: Tensor, boundaries: Tensor, c: Tensor, seq: Tensor, cu: Tensor, S: int, packed: bool
                  ) -> tuple[Tensor, Tensor]:
    """Returns (out [L, D], no state)."""
    return kernels.upsample_fwd(y, _segments(c, seq, cu, packed), S), nothing(y)


@_upsample_fwd.register_fake
def _(y, boundaries, c, seq, cu, S, packed):
    return y.new_empty((c.shape[0], y.shape[1])), nothing(y)


@custom_op("seqmix::segment_upsample_bwd", mutates_args=())
def _upsample_bwd(y: Tensor, boundaries: Tensor, c: Tensor, seq: Tensor, cu: Tensor, S: int, packed: bool,
                  dout: Tensor, dfinal: Tensor | None, needs: list[bool]) -> list[Tensor]:
    dy, db = kernels.upsample_bwd(dout, y, hard_boundaries(boundaries), _segments(c, seq, cu, packed), S)
    return as_input_grads((dy, db, None, None, None), (y, boundaries, c, seq, cu), needs, y)


register_autograd(_upsample_fwd, _upsample_bwd, num_inputs=5)


def segment_pool(
    x: torch.Tensor,
    boundaries: torch.Tensor,
    *,
    max_segments: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean of every closed segment: a boundary token closes its own segment.

    Args:
        x: [B, T, D] tokens (packed [1, L, D] with ``cu_seqlens``).
        boundaries: [B, T] floats in [0, 1]; above 0.5 is a boundary. May carry a gradient
            (a straight-through estimator): it gets the relaxed gradient of docs/math/pooling.md.
        max_segments: S, the segments kept per sequence; later ones are dropped (their tokens get
            no gradient). With it a dense call reads nothing back to the host (the value check of
            ``boundaries`` is an asynchronous assert on CUDA and under torch.compile,
            seqmix/kernels/checks.py). None: the largest count in the batch (one host sync).
        cu_seqlens: [N+1] int32/int64 bounds of sequences packed as [1, L, ...]; segments never
            cross a sequence boundary.
        backend: None (automatic), ``"reference"`` or ``"triton"``.

    Returns:
        [N, S, D] in x's dtype (N = B, or the number of packed sequences); segment s of sequence n
        at ``[n, s]``, rows past a sequence's count zero. The trailing unclosed segment is dropped.
    """
    check_tensor("x", x, (None, None, None), dims="[B, T, D]")
    B, T, D = x.shape
    _check_boundaries(boundaries, B, T, x)
    _check_max_segments(max_segments)
    n = _sequences(x, B, T, cu_seqlens)
    fused = _fused("segment_pool", backend, "x", x)
    bh = hard_boundaries(boundaries).reshape(-1)
    seg = segments_of(bh.view(B, T), B, T, n, cu_seqlens)
    S = max_segments if max_segments is not None else (int(seg.c.max()) if seg.c.numel() else 0)
    if B * T == 0 or S == 0:
        return x.new_zeros(n, S, D) + 0 * x.sum()  # keeps x in the graph for an all-zero gradient
    x2, b1 = x.reshape(B * T, D), boundaries.reshape(-1)
    if fused:
        pooled = _pool_fwd(x2.contiguous(), b1.contiguous(), seg.c, seg.seq, seg.cu, S)[0]
    else:
        pooled = reference.segment_pool(x2, b1, bh, seg, S)
    return pooled.view(n, S, D)


def segment_upsample(
    y: torch.Tensor,
    boundaries: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal upsampling: token t gets ``y[n, min(sum_{j<=t} b_j, S)]`` of its sequence n.

    Row 0 of every sequence is what tokens before its first boundary read (the layer's null
    vector); a boundary token reads the segment it closes. Tokens past the S-th boundary (segments
    dropped by ``max_segments``) read the last row.

    Args:
        y: [N, S+1, D] (N = B, or the number of packed sequences).
        boundaries: [B, T] floats in [0, 1] (above 0.5 is a boundary); may carry a gradient.
        cu_seqlens: [N+1] int32/int64 bounds of sequences packed as [1, L].
        backend: None (automatic), ``"reference"`` or ``"triton"``.

    Returns:
        [B, T, D] in y's dtype.
    """
    check_tensor("y", y, (None, None, None), dims="[N, S+1, D]")
    if not isinstance(boundaries, torch.Tensor) or boundaries.dim() != 2:
        check_tensor("boundaries", boundaries, (None, None), dims="[B, T]", like=y)
    B, T = boundaries.shape
    _check_boundaries(boundaries, B, T, y)
    n = _sequences(boundaries, B, T, cu_seqlens)
    if y.shape[0] != n or y.shape[1] < 1:
        raise ValueError(f"y must have shape [N, S+1, D] with N = {n} sequences and S+1 >= 1 rows, "
                         f"got {tuple(y.shape)}")
    N, S1, D = y.shape
    fused = _fused("segment_upsample", backend, "y", y)
    if B * T == 0:
        return y.new_zeros(B, T, D) + 0 * y.sum()
    bh = hard_boundaries(boundaries).reshape(-1)
    seg = segments_of(bh.view(B, T), B, T, n, cu_seqlens)
    y2, b1 = y.reshape(N * S1, D), boundaries.reshape(-1)
    if fused:
        out = _upsample_fwd(y2.contiguous(), b1.contiguous(), seg.c, seg.seq, seg.cu, S1 - 1, seg.packed)[0]
    else:
        out = reference.segment_upsample(y2, b1, bh, seg, S1 - 1)
    return out.view(B, T, D)


def chunk_select(x: torch.Tensor, boundaries: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None):
    """H-Net's chunking: the states of the boundary tokens, where a boundary starts a chunk.

    Args:
        x: [B, T, D] (packed [1, L, D] with ``cu_seqlens``).
        boundaries: [B, T] in [0, 1], above 0.5 is a boundary.
        cu_seqlens: [N+1] bounds of packed sequences.

    Returns:
        chunks [1, K, D] (the boundary tokens in order, packed) and their ``cu_seqlens`` [N+1] int64.
        Sizing K reads one number back to the host; the order needs no sort.
    """
    check_tensor("x", x, (None, None, None), dims="[B, T, D]")
    B, T, D = x.shape
    _check_boundaries(boundaries, B, T, x)
    n = _sequences(x, B, T, cu_seqlens)
    bh = hard_boundaries(boundaries).reshape(-1)
    seg = segments_of(bh.view(B, T), B, T, n, cu_seqlens)
    per_seq = torch.zeros(n, dtype=torch.int64, device=x.device).scatter_reduce_(0, seg.seq, seg.c, "amax")
    chunk_cu = torch.cat([per_seq.new_zeros(1), per_seq.cumsum(0)])
    index = bh.nonzero().squeeze(1)
    return x.reshape(B * T, D)[index].unsqueeze(0), chunk_cu


def ema_dechunk(
    z: torch.Tensor,
    p: torch.Tensor,
    boundaries: torch.Tensor,
    chunk_cu_seqlens: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    head_dim: int = 32,
    backend: str | None = None,
):
    """H-Net's de-chunking: ``e_k = p_k z_k + (1 - p_k) e_{k-1}`` over each sequence's chunks, computed
    with ``ssd`` (dt = -log(1 - p), A = -1, x = z / dt, B = p, C = 1), then token t reads e at its chunk
    (the last boundary at or before t), or the state before the first boundary.

    Args:
        z: [1, K, D] the chunks' outputs, packed as :func:`chunk_select` returns them.
        p: [1, K] the chunks' boundary probabilities; clamped to [1e-4, 1 - 1e-4] (H-Net's clamp), so
            dt stays finite. Gets a gradient through ``ssd``.
        boundaries: [B, T] the boundaries that made the chunks.
        chunk_cu_seqlens: [N+1] the chunks' bounds, from :func:`chunk_select`.
        cu_seqlens: [N+1] bounds of the token sequences (packed [1, L]).
        initial_state: [N, D] EMA value before the first chunk (zeros if None).
        output_final_state: also return e after the last chunk, [N, D] float32 (float64 for float64 z).
        head_dim: the head size the channels are split into for ``ssd`` (must divide D).
        backend: ``ssd``'s backend.

    Returns:
        out [B, T, D] in z's dtype, and the final state or None.
    """
    check_tensor("z", z, (1, None, None), dims="[1, K, D]")
    K, D = z.shape[1:]
    check_tensor("p", p, (1, K), dims="[1, K]", like=z)
    B, T = boundaries.shape if isinstance(boundaries, torch.Tensor) and boundaries.dim() == 2 else (0, 0)
    _check_boundaries(boundaries, B, T, z)
    n = _sequences(boundaries, B, T, cu_seqlens)
    check_tensor("chunk_cu_seqlens", chunk_cu_seqlens, (n + 1,), dims="[N+1]", like=z, floating=False)
    if D % head_dim:
        raise ValueError(f"head_dim={head_dim} must divide the width D={D} of z")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, (n, D), dims="[N, D]", like=z)
    from seqmix.kernels import ssd  # the public op; imported here, seqmix.kernels imports this module

    H, dtype = D // head_dim, reference_dtype(z)
    pc = p.to(dtype).clamp(1e-4, 1 - 1e-4)
    dt = -torch.log1p(-pc)
    xs = (z.to(dtype) / dt[..., None]).view(1, K, H, head_dim)
    h0 = None if initial_state is None else initial_state.to(dtype).view(n, H, head_dim, 1)
    e, final = ssd(xs, dt[..., None].expand(1, K, H), -torch.ones(H, device=z.device), pc.view(1, K, 1, 1),
                   torch.ones(1, K, 1, 1, device=z.device, dtype=dtype), initial_state=h0,
                   output_final_state=output_final_state, cu_seqlens=chunk_cu_seqlens, backend=backend)
    start = torch.zeros(n, D, device=z.device, dtype=dtype) if h0 is None else initial_state.to(dtype)
    table = torch.cat([start, e.reshape(K, D).to(dtype)])
    bh = hard_boundaries(boundaries).reshape(-1)
    seg = segments_of(bh.view(B, T), B, T, n, cu_seqlens)
    chunk_cu = chunk_cu_seqlens.to(torch.int64)
    row = torch.where(seg.c > 0, n + chunk_cu[:-1][seg.seq] + seg.c - 1, seg.seq)
    out = table[row].view(B, T, D).to(z.dtype)
    return out, (None if final is None else final.view(n, D))
