"""Argument checks shared by the public ops.

Every failure is a ValueError that names the argument and what was expected,
so a caller sees which tensor is wrong before any kernel runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    t,
    expected: Sequence[int | None],
    *,
    dims: str,
    like: torch.Tensor | None = None,
    floating: bool = True,
) -> None:
    """Check rank, sizes, dtype and device of one argument.

    ``expected`` gives each dimension's size, None where any size goes;
    ``dims`` spells the expected shape for the message (e.g. ``"[B, T, H, K]"``).
    ``like`` is the tensor whose device (and, for floating tensors, dtype
    family) the argument must match.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {dims}, got {type(t).__name__}")
    if t.dim() != len(expected):
        raise ValueError(f"{name} must have shape {dims} ({len(expected)} dims), got {tuple(t.shape)}")
    for size, want in zip(t.shape, expected):
        if want is not None and size != want:
            want_shape = tuple("*" if w is None else w for w in expected)
            raise ValueError(f"{name} must have shape {dims} = {want_shape}, got {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {like.device}")


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """All ``tensors`` must share one dtype (states excepted: they are float32 by contract)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        found = ", ".join(f"{n}={t.dtype}" for n, t in zip(names, tensors))
        raise ValueError(f"{', '.join(names)} must share one dtype, got {found}")


def check_cu_seqlens(cu_seqlens, *, batch: int, total: int, like: torch.Tensor) -> int:
    """Validate FlashAttention-style ``cu_seqlens`` and return the number of sequences.

    ``cu_seqlens`` is int32 or int64 of shape [N+1]: 0, then the running
    totals of the packed sequences' lengths, ending at the packed length.
    Checking the values costs one device-to-host copy of N+1 integers.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be an int32/int64 tensor of shape [N+1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape [N+1] with N >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != like.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {like.device}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the inputs must be packed as [1, total, ...], got batch size {batch}")
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"cu_seqlens must end at the packed length T={total}, got {values[-1]}")
    return len(values) - 1


def check_scale(scale, default: float) -> float:
    if scale is None:
        return default
    scale = float(scale)
    if not scale == scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be a finite number, got {scale}")
    return scale


def check_log_decay(name: str, g, expected: Sequence[int | None], *, dims: str, like: torch.Tensor) -> None:
    """A tensor of log decays: shape and device as :func:`check_tensor`, and no positive value
    (exp(g) > 1 would grow the state; the kernels' decay ratios assume g <= 0). Checking the
    values reads one boolean back to the host."""
    check_tensor(name, g, expected, dims=dims, like=like)
    if g.numel() and bool((g > 0).any()):
        raise ValueError(f"{name} holds log decays and must be <= 0 everywhere, got a maximum of {g.max().item():.4g}")
