"""Pieces shared by the Triton kernels of every family: tiles, chunk positions, dots, configs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmix.kernels.backend import triton_interpreting


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The configs to autotune over; the interpreter cannot benchmark, so it gets the first alone."""
    return configs[:1] if triton_interpreting() else configs


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for float32 operands, following PyTorch's TF32 switch for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def head_block(d: int) -> int:
    """Block size covering a head dimension: a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(d))


@triton.jit
def chunk_position(chunk_index, cu_seqlens, i_c, BT: tl.constexpr):
    """Sequence ``i_n``, chunk ``i_t`` within it, first token ``t0`` and rows ``nt`` of chunk ``i_c``."""
    i_n = tl.load(chunk_index + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_index + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT
    nt = tl.minimum(eos - t0, BT)
    return i_n, i_t, t0, nt


@triton.jit
def token_tile(base, t0, nt, row_stride, c0, ncol, BT: tl.constexpr, BC: tl.constexpr):
    """Pointers and mask of a [BT, BC] tile of a token-major tensor.

    Rows are tokens ``t0 .. t0+nt-1`` (``row_stride`` elements apart), columns
    ``c0 .. ncol-1``; ``base`` already points at the head. Offsets are int64.
    """
    rows = tl.arange(0, BT)
    cols = c0 + tl.arange(0, BC)
    ptrs = base + t0.to(tl.int64) * row_stride + (rows[:, None] * row_stride + cols[None, :])
    mask = (rows < nt)[:, None] & (cols < ncol)[None, :]
    return ptrs, mask


@triton.jit
def token_vector(base, t0, nt, row_stride, BT: tl.constexpr):
    """Pointers and mask of one value per token (a [BT] column such as beta)."""
    rows = tl.arange(0, BT)
    return base + (t0 + rows).to(tl.int64) * row_stride, rows < nt


@triton.jit
def state_tile(base, r0, nrow, c0, ncol, BR: tl.constexpr, BC: tl.constexpr):
    """Pointers and mask of a [BR, BC] tile of a row-major [nrow, ncol] matrix at ``base``."""
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    ptrs = base + rows[:, None] * ncol + cols[None, :]
    mask = (rows < nrow)[:, None] & (cols < ncol)[None, :]
    return ptrs, mask


@triton.jit
def mm(a, b, DTYPE: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` on the tensor cores: operands in the inputs' dtype, accumulation in float32."""
    return tl.dot(a.to(DTYPE), b.to(DTYPE), input_precision=PREC)
