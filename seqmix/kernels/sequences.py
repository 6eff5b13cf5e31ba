"""Sequence and chunk indexing shared by the chunked kernels.

The fused kernels see every batch as packed sequences: a dense ``[B, T, ...]``
batch is ``B`` sequences of length ``T`` at offsets ``0, T, 2T, ...``. A
chunked kernel launches one program per chunk; ``chunk_index`` maps a
program to its sequence and chunk, and ``chunk_offsets`` maps a sequence to
the global number of its first chunk (where per-chunk states are stored).
Chunks never straddle sequences: each sequence starts a new chunk.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Chunking:
    """How a packed batch splits into chunks of ``chunk_size`` tokens.

    cu_seqlens:     [N+1] int64, sequence boundaries in the packed token axis
    chunk_index:    [NC, 2] int32, (sequence, chunk within the sequence) per chunk
    chunk_offsets:  [N+1] int64, global index of each sequence's first chunk
    """

    cu_seqlens: torch.Tensor
    chunk_index: torch.Tensor
    chunk_offsets: torch.Tensor
    chunk_size: int

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_chunks(self) -> int:
        return self.chunk_index.shape[0]


@functools.lru_cache(maxsize=64)
def dense_chunking(batch: int, seqlen: int, chunk_size: int, device: torch.device) -> Chunking:
    """Chunks of ``batch`` sequences of ``seqlen`` > 0 tokens each, built without a host sync
    and cached: a training or decoding loop asks for the same few shapes again and again."""
    per_seq = -(-seqlen // chunk_size)
    cu = torch.arange(0, batch + 1, device=device, dtype=torch.int64) * seqlen
    offsets = torch.arange(0, batch + 1, device=device, dtype=torch.int64) * per_seq
    seq = torch.arange(batch, device=device).repeat_interleave(per_seq)
    within = torch.arange(per_seq, device=device).repeat(batch)
    index = torch.stack([seq, within], 1).to(torch.int32)
    return Chunking(cu_seqlens=cu, chunk_index=index, chunk_offsets=offsets, chunk_size=chunk_size)


def make_chunking(cu_seqlens: torch.Tensor, chunk_size: int) -> Chunking:
    """Chunks of packed sequences; sizing the index reads the chunk count back to the host."""
    cu = cu_seqlens.to(torch.int64)
    device = cu.device
    n = cu.numel() - 1
    per_seq = (cu[1:] - cu[:-1] + chunk_size - 1) // chunk_size
    total = int(per_seq.sum().item())
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(per_seq, 0)
    seq = torch.repeat_interleave(torch.arange(n, device=device), per_seq, output_size=total)
    within = torch.arange(total, device=device) - offsets[seq]
    index = torch.stack([seq, within], 1).to(torch.int32)
    return Chunking(cu_seqlens=cu, chunk_index=index, chunk_offsets=offsets, chunk_size=chunk_size)


def chunking_for(batch: int, seqlen: int, chunk_size: int, device: torch.device, cu_seqlens=None) -> Chunking:
    """Chunks of an op's input: the dense shortcut for [batch, seqlen] without ``cu_seqlens``,
    else the packed sequences ``cu_seqlens`` describes."""
    if cu_seqlens is None:
        # A compiled graph builds the index in the graph (it cannot hold the cache's tensors).
        build = dense_chunking.__wrapped__ if torch.compiler.is_compiling() else dense_chunking
        return build(batch, seqlen, chunk_size, device)
    return make_chunking(cu_seqlens, chunk_size)


@functools.lru_cache(maxsize=64)
def _dense_bounds(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch + 1, device=device, dtype=torch.int64) * seqlen


def packed_bounds(batch: int, seqlen: int, device: torch.device, cu_seqlens=None) -> torch.Tensor:
    """int64 [N+1] sequence boundaries of an op's input (the dense batch's cached without a host
    sync), for kernels that take boundaries and no chunk index (the conv family's CUDA kernels)."""
    if cu_seqlens is None:
        return _dense_bounds(batch, seqlen, device)
    return cu_seqlens.to(torch.int64)


def reference_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the PyTorch references compute in: float64 for float64 inputs, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in ``dtype``; t itself when it is already (a decoding step's ops are a few microseconds each, and a
    ``.to`` that changes nothing still dispatches)."""
    return t if t.dtype == dtype else t.to(dtype)


def sequence_spans(cu_seqlens, batch: int, seqlen: int) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence of a dense [batch, seqlen] or packed input,
    for the PyTorch references (reads ``cu_seqlens`` back to the host)."""
    if cu_seqlens is None:
        return [(b, 0, seqlen) for b in range(batch)]
    bounds = cu_seqlens.tolist()
    return [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]


def over_sequences(run, batch: int, seqlen: int, cu_seqlens, initial_state, zero_state, dtype):
    """Run ``run(b, s, e, h) -> (y [e - s, ...], h_final)`` on every sequence of a dense or packed
    input (batch row b, tokens s..e-1, entering state h: the initial state's row in ``dtype``, or
    ``zero_state``), for the PyTorch references. Returns y as [B, T, ...] ([1, L, ...] when packed)
    and the final states stacked."""
    outs, finals = [], []
    for n, (b, s, e) in enumerate(sequence_spans(cu_seqlens, batch, seqlen)):
        h = zero_state if initial_state is None else initial_state[n].to(dtype)
        y, h = run(b, s, e, h)
        outs.append(y)
        finals.append(h)
    y = torch.cat(outs)[None] if cu_seqlens is not None else torch.stack(outs)
    return y, torch.stack(finals)
