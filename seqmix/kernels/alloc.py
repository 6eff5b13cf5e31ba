"""Output allocation for the fused kernels.

Kernels write their outputs into buffers from :func:`empty`. Under test the
buffers are filled with NaN first (``SEQMIX_POISON_EMPTY=1``, set by the test
suite), so an element a kernel forgot to write shows up as a NaN instead of
whatever the allocator happened to hold.
"""

from __future__ import annotations

import os

import torch


def poisoning() -> bool:
    return os.environ.get("SEQMIX_POISON_EMPTY", "0") not in ("", "0")


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    if poisoning() and out.is_floating_point():
        out.fill_(float("nan"))
    return out

