"""Sequence and chunk indexing shared by the chunked kernels.

The fused kernels see every batch as packed sequences: a dense ``[B, T, ...]``
batch is ``B`` sequences of length ``T`` at offsets ``0, T, 2T, ...``. A
chunked kernel launches one program per chunk; ``chunk_index`` maps a
program to its sequence and chunk, and ``chunk_offsets`` maps a sequence to
the global number of its first chunk (where per-chunk states are stored).
Chunks never straddle sequences: each sequence starts a new chunk.
"""

from __future__ import annotations

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


def dense_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """Boundaries of ``batch`` sequences of ``seqlen`` tokens each, as int64 [batch+1]."""
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int64, device=device)[: batch + 1]


def make_chunking(cu_seqlens: torch.Tensor, chunk_size: int, *, dense_seqlen: int | None = None) -> Chunking:
    """Chunk indices of packed sequences.

    ``dense_seqlen`` says every sequence has that length, which lets the
    indices be built without reading ``cu_seqlens`` back to the host.
    """
    cu = cu_seqlens.to(torch.int64)
    device = cu.device
    n = cu.numel() - 1
    if dense_seqlen is not None:
        per_seq = torch.full((n,), -(-dense_seqlen // chunk_size), dtype=torch.int64, device=device)
        total = n * int(-(-dense_seqlen // chunk_size))
    else:
        per_seq = (cu[1:] - cu[:-1] + chunk_size - 1) // chunk_size
        total = int(per_seq.sum().item())
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(per_seq, 0)
    seq = torch.repeat_interleave(torch.arange(n, device=device), per_seq, output_size=total)
    within = torch.arange(total, device=device) - offsets[seq]
    index = torch.stack([seq, within], 1).to(torch.int32)
    return Chunking(cu_seqlens=cu, chunk_index=index, chunk_offsets=offsets, chunk_size=chunk_size)
