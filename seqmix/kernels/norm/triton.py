"""Triton kernels of the fused residual add + RMSNorm over rows of D channels.

A program holds BM whole rows (BD >= D channels) in registers: the forward adds, stores the sum,
normalises and stores; it keeps one float32 rstd per row for the backward. The backward walks a
contiguous range of rows per program and accumulates the weight's gradient for those rows in
float32, written as one partial row per program and summed on the host (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmix.kernels.alloc import empty


def _tile(D: int) -> tuple[int, int, int]:
    """(BM rows per tile, BD channels, num_warps): about 2048 elements per tile (16 per thread, which
    kept the fp32 backward at D = 320 without stack), at least one row."""
    BD = triton.next_power_of_2(D)
    return max(1, min(16, 2048 // BD)), BD, 4 if BD <= 1024 else 8 if BD <= 8192 else 16


@triton.jit
def add_rms_norm_fwd_kernel(
    x, residual, weight, normed, new_residual, rstd, M, D, eps,
    HAS_RESIDUAL: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BM
    rows = tl.arange(0, BM)
    cols = tl.arange(0, BD)
    mask = (row0 + rows < M)[:, None] & (cols < D)[None, :]
    offs = row0 * D + (rows[:, None] * D + cols[None, :])
    h = tl.load(x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Round the sum to the stream's dtype before normalising, so normed is the norm of what is stored.
        h = (h.to(tl.float32) + tl.load(residual + offs, mask=mask, other=0.0).to(tl.float32)).to(h.dtype)
        tl.store(new_residual + offs, h, mask=mask)
    h = h.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / D + eps)
    tl.store(rstd + row0 + rows, r, mask=row0 + rows < M)
    w = tl.load(weight + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(normed + offs, (h * r[:, None] * w[None, :]).to(normed.dtype.element_ty), mask=mask)


@triton.jit
def add_rms_norm_bwd_kernel(
    h, weight, rstd, dnormed, dnew_residual, dh, dweight_part, M, D, rows_per_program,
    HAS_DNORMED: tl.constexpr, HAS_DRESIDUAL: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
):
    """dh = rstd * (g - xhat * mean(g * xhat)) (+ the new residual's gradient), g = dnormed * w,
    xhat = h * rstd; the weight's gradient sum(dnormed * xhat) over this program's rows."""
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * rows_per_program
    rows = tl.arange(0, BM)
    cols = tl.arange(0, BD)
    w = tl.load(weight + cols, mask=cols < D, other=0.0).to(tl.float32)
    dw = tl.zeros([BD], dtype=tl.float32)
    for i in range(0, rows_per_program, BM):
        row0 = first + i
        in_rows = (row0 + rows < M) & (i + rows < rows_per_program)
        mask = in_rows[:, None] & (cols < D)[None, :]
        offs = row0 * D + (rows[:, None] * D + cols[None, :])
        grad = tl.zeros([BM, BD], dtype=tl.float32)
        if HAS_DNORMED:
            r = tl.load(rstd + row0 + rows, mask=in_rows, other=0.0)
            xhat = tl.load(h + offs, mask=mask, other=0.0).to(tl.float32) * r[:, None]
            dy = tl.load(dnormed + offs, mask=mask, other=0.0).to(tl.float32)
            g = dy * w[None, :]
            c = tl.sum(g * xhat, axis=1) / D
            grad += (g - xhat * c[:, None]) * r[:, None]
            dw += tl.sum(dy * xhat, axis=0)
        if HAS_DRESIDUAL:
            grad += tl.load(dnew_residual + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dh + offs, grad.to(dh.dtype.element_ty), mask=mask)
    tl.store(dweight_part + pid.to(tl.int64) * D + cols, dw, mask=cols < D)


def add_rms_norm_fwd(x2d: torch.Tensor, residual2d: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """x2d, residual2d [M, D] contiguous, weight [D]: (normed [M, D], new_residual [M, D] or None, rstd [M] float32)."""
    M, D = x2d.shape
    BM, BD, warps = _tile(D)
    normed = empty(M, D, dtype=x2d.dtype, device=x2d.device)
    new_residual = None if residual2d is None else empty(M, D, dtype=x2d.dtype, device=x2d.device)
    rstd = empty(M, dtype=torch.float32, device=x2d.device)
    add_rms_norm_fwd_kernel[(triton.cdiv(M, BM),)](
        x2d, residual2d, weight, normed, new_residual, rstd, M, D, eps,
        HAS_RESIDUAL=residual2d is not None, BM=BM, BD=BD, num_warps=warps,
    )
    return normed, new_residual, rstd


def _programs(device: torch.device, M: int, BM: int) -> int:
    """Backward programs: a few per SM on a GPU (each then sums many rows into one weight partial)."""
    tiles = triton.cdiv(M, BM)
    if device.type != "cuda":
        return min(tiles, 4)
    return min(tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count)


def add_rms_norm_bwd(h2d, weight, rstd, dnormed2d, dnew_residual2d):
    """Gradients (dh [M, D] in h's dtype, dweight [D] float32) from those of normed and the new residual."""
    M, D = h2d.shape
    BM, BD, warps = _tile(D)
    programs = _programs(h2d.device, M, BM)
    rows_per_program = triton.cdiv(triton.cdiv(M, programs), BM) * BM
    programs = triton.cdiv(M, rows_per_program)
    dh = empty(M, D, dtype=h2d.dtype, device=h2d.device)
    dweight_part = empty(programs, D, dtype=torch.float32, device=h2d.device)
    add_rms_norm_bwd_kernel[(programs,)](
        h2d, weight, rstd, dnormed2d, dnew_residual2d, dh, dweight_part, M, D, rows_per_program,
        HAS_DNORMED=dnormed2d is not None, HAS_DRESIDUAL=dnew_residual2d is not None, BM=BM, BD=BD, num_warps=warps,
    )
    return dh, dweight_part.sum(0)


KERNELS = (add_rms_norm_fwd_kernel, add_rms_norm_bwd_kernel)
