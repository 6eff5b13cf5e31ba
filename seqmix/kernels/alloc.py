"""Output allocation for the fused kernels.

Kernels write their outputs into buffers from :func:`empty`. Under test the
buffers are filled with NaN first (``SEQMIX_POISON_EMPTY=1``, set by the test
suite), so an element a kernel forgot to write shows up as a NaN instead of
whatever the allocator happened to hold.
"""

from __future__ import annotations

import os

import torch

from seqmix.kernels.sequences import reference_dtype


def poisoning() -> bool:
    return os.environ.get("SEQMIX_POISON_EMPTY", "0") not in ("", "0")


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    if poisoning() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def no_tokens_result(out_shape, state_shape, initial_state, output_final_state: bool, like: torch.Tensor):
    """What an op with a state returns for T = 0: an empty output in ``like``'s dtype and, when the
    final state is asked for, a copy of the initial state or zeros (float32; float64 for float64)."""
    out = like.new_empty(out_shape)
    if not output_final_state:
        return out, None
    if initial_state is not None:
        return out, initial_state.clone()
    return out, like.new_zeros(state_shape, dtype=reference_dtype(like))
