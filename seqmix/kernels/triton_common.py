"""Pieces shared by the Triton kernels of every family: tiles, chunk positions, dots, configs.

Token-major tensors are ``[L, H, D]`` (packed tokens, heads, channels): a tile
is rows of tokens ``t0 ..`` of one head and a range of channels. Tile offsets
are int32 relative to a scalar int64 base, so tensors past 2^31 elements are
addressed correctly without carrying 64-bit offsets per element.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from seqmix.kernels.alloc import empty
from seqmix.kernels.backend import triton_interpreting

# F.softplus returns x itself above this; the kernels do the same, for the same values and gradients.
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The configs to autotune over. The interpreter cannot benchmark, so it gets one alone;
    ``SEQMIX_AUTOTUNE=0`` does the same on a GPU, where a test run over many head dims would
    otherwise spend its time compiling every config of every shape. That one is the first with the
    fewest pipeline stages: the autotuner passes over a config that needs more shared memory than
    the GPU has, a single config cannot be passed over, and the delta rule's pipelined state kernel
    at K = 256 in float32 needs 345 KiB (an H200 has 227 KiB a block)."""
    if triton_interpreting() or os.environ.get("SEQMIX_AUTOTUNE", "1") in ("", "0"):
        return [min(configs, key=lambda c: c.num_stages)]
    return configs


# Triton keeps compiled kernels in its cache directory, but its autotuner times every config again in each new
# process (each config's binary loaded and run for ~0.1 s, per kernel and shape: seconds for GLA's eight kernels
# and 44 configs). With `cache_results` (Triton 3.9 here has it) the timings are kept there too, and a later
# process runs the chosen config at once. Looked up rather than assumed, so that a Triton without it still
# imports seqmix.
_CACHE_RESULTS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """``triton.autotune`` with its results cached on disk where Triton can (``configs`` from
    :func:`autotune_configs`; ``kwargs``: its other arguments, ``restore_value`` and the like)."""
    return triton.autotune(configs=configs, key=key, **_CACHE_RESULTS, **kwargs)


def state_configs(block: str) -> list[triton.Config]:
    """Configs of a sequential state kernel: the block of the state's second dim it owns (``block``,
    32 or 64), the warps, and 3 pipeline stages (Triton's default) or 1. Pipelined, the delta rule's
    state kernels take 116-168 KB of shared memory at the anchor shape, one block per SM and ~3.9
    waves; with one stage two blocks fit (docs/hopper_report.md, "What to tune first")."""
    return autotune_configs([triton.Config({block: b}, num_warps=w, num_stages=s)
                             for s in (3, 1) for b in (32, 64) for w in (4, 8)])


def chunk_configs() -> list[triton.Config]:
    """Configs of a per-chunk kernel: warps and pipeline stages."""
    return autotune_configs([triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)])


def key_value_blocks(K: int, V: int) -> dict[str, int]:
    """Block sizes of the linear-attention kernels: BK covers the key dim (state tiles), BKC is the
    key slice of per-chunk kernels, BV the value block of per-chunk kernels (the sequential kernels
    autotune theirs)."""
    BK = head_block(K)
    return {"BK": BK, "BKC": min(64, BK), "BV": min(64, head_block(V))}


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for float32 operands, following PyTorch's TF32 switch for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def head_block(d: int) -> int:
    """Block size covering a head dimension: a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(d))


@triton.jit
def sequence_bounds(cu_seqlens, i_n):
    """First token and one past the last token of packed sequence ``i_n``, as int64."""
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    return bos, eos


@triton.jit
def sequence_program(chunk_offsets, cu_seqlens, H: tl.constexpr, STATE: tl.constexpr):
    """A sequential program of grid ((sequence, head), block): its head i_h and block i_b, the
    sequence's tokens bos .. eos-1 and first chunk c0, and the offset of the (sequence, head)'s
    state of STATE elements in an [N, H, ...] state tensor."""
    i_nh, i_b = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    return i_h, i_b, bos, eos, c0, i_nh.to(tl.int64) * STATE


@triton.jit
def chunk_position(chunk_index, cu_seqlens, i_c, BT: tl.constexpr):
    """Sequence ``i_n``, chunk ``i_t`` within it, first token ``t0`` and rows ``nt`` of chunk ``i_c``."""
    i_n = tl.load(chunk_index + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_index + i_c * 2 + 1).to(tl.int64)
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    t0 = bos + i_t * BT
    nt = tl.minimum(eos - t0, BT)
    return i_n, i_t, t0, nt


@triton.jit
def _token_tile(base, t0, nt, row_stride, c0, ncol, BT: tl.constexpr, BC: tl.constexpr):
    rows = tl.arange(0, BT)
    cols = c0 + tl.arange(0, BC)
    ptrs = base + t0.to(tl.int64) * row_stride + (rows[:, None] * row_stride + cols[None, :])
    mask = (rows < nt)[:, None] & (cols < ncol)[None, :]
    return ptrs, mask


@triton.jit
def load_rows(base, t0, nt, row_stride, c0, ncol, BT: tl.constexpr, BC: tl.constexpr):
    """The [BT, BC] tile of tokens ``t0 .. t0+nt-1`` (``row_stride`` elements apart) and
    channels ``c0 .. ncol-1`` of the head at ``base``; rows and columns outside read zero."""
    ptrs, mask = _token_tile(base, t0, nt, row_stride, c0, ncol, BT, BC)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_rows(base, x, t0, nt, row_stride, c0, ncol, BT: tl.constexpr, BC: tl.constexpr):
    """Store the [BT, BC] tile ``x`` where :func:`load_rows` reads, in the tensor's dtype."""
    ptrs, mask = _token_tile(base, t0, nt, row_stride, c0, ncol, BT, BC)
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def load_row_values(base, t0, nt, row_stride, BT: tl.constexpr):
    """One value per token (a [BT] column such as beta) as float32; rows past ``nt`` read zero."""
    rows = tl.arange(0, BT)
    return tl.load(base + t0.to(tl.int64) * row_stride + rows * row_stride, mask=rows < nt, other=0.0).to(tl.float32)


@triton.jit
def store_row_values(base, x, t0, nt, row_stride, BT: tl.constexpr):
    rows = tl.arange(0, BT)
    tl.store(base + t0.to(tl.int64) * row_stride + rows * row_stride, x.to(base.dtype.element_ty), mask=rows < nt)


@triton.jit
def _matrix_tile(base, r0, nrow, c0, ncol, BR: tl.constexpr, BC: tl.constexpr):
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    return base + (rows[:, None] * ncol + cols[None, :]), (rows < nrow)[:, None] & (cols < ncol)[None, :]


@triton.jit
def load_matrix(base, r0, nrow, c0, ncol, BR: tl.constexpr, BC: tl.constexpr):
    """The [BR, BC] tile at (r0, c0) of the row-major [nrow, ncol] matrix at ``base``; outside reads zero."""
    ptrs, mask = _matrix_tile(base, r0, nrow, c0, ncol, BR, BC)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_matrix(base, x, r0, nrow, c0, ncol, BR: tl.constexpr, BC: tl.constexpr):
    ptrs, mask = _matrix_tile(base, r0, nrow, c0, ncol, BR, BC)
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def mm(a, b, DTYPE: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` on the tensor cores: operands in the inputs' dtype, accumulation in float32."""
    return tl.dot(a.to(DTYPE), b.to(DTYPE), input_precision=PREC)


@triton.jit
def softplus(x):
    """log(1 + exp(x)) of float32 x, and x itself above :data:`SOFTPLUS_THRESHOLD` (as ``F.softplus``)."""
    return tl.where(x > SOFTPLUS_THRESHOLD, x, tl.log(1.0 + tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))))


@triton.jit
def softplus_backward(dy, x):
    """The gradient of :func:`softplus` at x times dy."""
    return tl.where(x > SOFTPLUS_THRESHOLD, dy, dy * tl.sigmoid(x))


@triton.jit
def silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def decay_ratio(b_row, b_col, keep):
    """exp(b_row[i] - b_col[j]) where ``keep`` (a [BR, BC] or broadcastable block mask), else 0.

    For cumulative log decays the ratio is only taken where i is at or after j, so the exponent
    is never positive; masking the exponent (not the result) keeps exp(+large) = inf out of every
    product, even in rows past a sequence's end.
    """
    return tl.exp(tl.where(keep, b_row[:, None] - b_col[None, :], float("-inf")))


@autotune(configs=autotune_configs([triton.Config({}, num_warps=w) for w in (2, 4)]), key=["D"])
@triton.jit
def chunk_local_cumsum_fwd_kernel(
    x, out, chunk_index, cu_seqlens,
    H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr,
):
    """Cumulative sum of x [L, H, D] over the tokens of each chunk (from its end when REVERSE), in float32."""
    i_c, i_d, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, _, t0, nt = chunk_position(chunk_index, cu_seqlens, i_c, BT)
    b_x = load_rows(x + i_h * D, t0, nt, H * D, i_d * BD, D, BT, BD).to(tl.float32)
    store_rows(out + i_h * D, tl.cumsum(b_x, axis=0, reverse=REVERSE), t0, nt, H * D, i_d * BD, D, BT, BD)


def chunk_local_cumsum(x: torch.Tensor, chunking, reverse: bool = False) -> torch.Tensor:
    """float32 cumulative sums of ``x`` ([L, H] or [L, H, D], packed tokens) inside every chunk of
    ``chunking``: the in-chunk cumulative log decays of the gated ops, and (``reverse``) their gradients."""
    L, H = x.shape[:2]
    D = x.shape[2] if x.dim() == 3 else 1
    out = empty(*x.shape, dtype=torch.float32, device=x.device)
    BD = min(64, triton.next_power_of_2(D))
    chunk_local_cumsum_fwd_kernel[(chunking.num_chunks, triton.cdiv(D, BD), H)](
        x, out, chunking.chunk_index, chunking.cu_seqlens, H=H, D=D, BT=chunking.chunk_size, BD=BD, REVERSE=reverse,
    )
    return out


@triton.jit
def load_row(base, t, row_stride, c0, ncol, BC: tl.constexpr):
    """Channels ``c0 .. ncol-1`` of token ``t`` as a [BC] float32 vector (columns past ``ncol`` read
    zero). ``t`` must be a token of the tensor: callers clamp it into their sequence."""
    cols = c0 + tl.arange(0, BC)
    return tl.load(base + t.to(tl.int64) * row_stride + cols, mask=cols < ncol, other=0.0).to(tl.float32)


@triton.jit
def exp_rows(e, valid):
    """exp(e) for an [R, C] tile of exponents on the rows where ``valid`` ([R]), 0 on the others:
    rows past a sequence's end hold exponents that could be positive, and are never exponentiated."""
    return tl.exp(tl.where(valid[:, None], e, float("-inf")))
