"""What the families' Triton kernels take, and the chunks the op glue cuts sequences into for them: known
without importing Triton. The kernels' modules import it (~0.2 s with seqmix's kernels), so each family loads
its module at its first Triton call (:class:`seqmix.kernels.backend.LazyModule`): a process on the CPU never
does, and a machine without Triton runs every other backend (docs/design.md, "Thirty-second round")."""

from __future__ import annotations

import torch

# Tokens per chunk of each family's chunked Triton kernels (their BT; the op glue's chunk index).
# causal_conv1d's rows per program: 32 rows by 64 channels over 8 warps compile to ~120 registers and no spills on
# sm_90 (tests/kernels/conv/test_sm90_compile.py).
CONV_CHUNK = 32
DYNAMIC_CONV_CHUNK = 32
DELTA_RULE_CHUNK = 64
GLA_CHUNK = 64
SCAN_CHUNK = 64
SSD_CHUNK = 64

# The head (and state) dims the chunked kernels take: their register tiles are sized for it.
MAX_HEAD_DIM = 256
HALF_OR_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def unsupported(names: str, dtype: torch.dtype, dims_name: str = "head dims", **dims: int) -> str | None:
    """Why a family's Triton kernels cannot take inputs ``names`` of ``dtype`` with these dims (``dims_name``,
    at most :data:`MAX_HEAD_DIM` each); None if they can."""
    if dtype not in HALF_OR_FLOAT:
        return f"{names} must be float16, bfloat16 or float32, got {dtype}"
    if dims and max(dims.values()) > MAX_HEAD_DIM:
        sizes = ", ".join(f"{k}={v}" for k, v in dims.items())
        return f"{dims_name} up to {MAX_HEAD_DIM}, got {sizes}"
    return None
