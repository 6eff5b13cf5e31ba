"""Argument checks shared by the public ops.

Every failure is a ValueError that names the argument and what was expected,
so a caller sees which tensor is wrong before any kernel runs.
"""

from __future__ import annotations

import math
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


def check_sequences(cu_seqlens, initial_state, state_shape: Sequence[int], *, dims: str, like: torch.Tensor) -> int:
    """The number of sequences N of an op's input ``like`` ([B, T, ...]: B, or the packed sequences
    ``cu_seqlens`` describes), after checking ``initial_state`` (None, or [N, *state_shape], spelled
    ``dims``)."""
    B, T = like.shape[:2]
    n = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, batch=B, total=T, like=like)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, (n, *state_shape), dims=dims, like=like)
    return n


def check_query_key_value(q, k, v) -> None:
    """q, k [B, T, H, K] and v [B, T, H, V] of the linear-attention ops (delta rule, GLA)."""
    check_tensor("q", q, (None, None, None, None), dims="[B, T, H, K]")
    B, T, H, K = q.shape
    check_tensor("k", k, (B, T, H, K), dims="[B, T, H, K]", like=q)
    check_tensor("v", v, (B, T, H, None), dims="[B, T, H, V]", like=q)


def check_key_value_state(q, v, initial_state, cu_seqlens) -> int:
    """Positive head dims K, V, and an initial state [N, H, K, V] of the linear-attention ops;
    returns the number of sequences N."""
    K, V = q.shape[-1], v.shape[-1]
    if K == 0 or V == 0:
        raise ValueError(f"head dims must be positive, got K={K}, V={V}")
    return check_sequences(cu_seqlens, initial_state, (q.shape[2], K, V), dims="[N, H, K, V]", like=q)


def check_key_value_step(q, k, v, state, **per_head):
    """Shapes of a one-token linear-attention step: q, k [B, H, K], v [B, H, V], state [B, H, K, V], and
    each of ``per_head`` [B, H] (its name the keyword). Shapes only: a check of values would synchronise."""
    check_tensor("q", q, (None, None, None), dims="[B, H, K]")
    B, H, K = q.shape
    check_tensor("k", k, (B, H, K), dims="[B, H, K]", like=q)
    check_tensor("v", v, (B, H, None), dims="[B, H, V]", like=q)
    check_tensor("state", state, (B, H, K, v.shape[-1]), dims="[B, H, K, V]", like=q)
    for name, t in per_head.items():
        check_tensor(name, t, (B, H), dims="[B, H]", like=q)


def check_scale(scale, default: float) -> float:
    if scale is None:
        return default
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    return scale


def check_eps(name: str, eps) -> None:
    """A norm's epsilon: a positive finite number."""
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {eps!r}")


def check_values(ok: torch.Tensor, requirement: str, found) -> None:
    """Check a condition on an argument's values: ``ok`` is a one-element bool tensor,
    ``requirement`` names the argument and what it must satisfy, ``found()`` says what it holds.

    On CPU tensors in eager mode a failure raises ValueError. On CUDA tensors, and while
    ``torch.compile`` traces, the check is ``torch._assert_async``: no host synchronisation and
    allowed under CUDA graph capture, so it stays on in decoding steps and captured graphs; a
    failure surfaces as a device-side assertion (a RuntimeError) at a later synchronisation.
    """
    if ok.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(ok, requirement)
        return
    if not bool(ok):
        raise ValueError(f"{requirement}, got {found()}")


def check_log_decay(name: str, g, expected: Sequence[int | None], *, dims: str, like: torch.Tensor) -> None:
    """A tensor of log decays: shape and device as :func:`check_tensor`, and no positive value
    (exp(g) > 1 would grow the state; the kernels' decay ratios assume g <= 0)."""
    check_tensor(name, g, expected, dims=dims, like=like)
    if g.numel():
        check_values((g <= 0).all(), f"{name} holds log decays and must be <= 0 everywhere",
                     lambda: f"a maximum of {g.max().item():.4g}")


def check_negative(name: str, a: torch.Tensor) -> None:
    """A state matrix must be negative (a decay): exp(dt' A) <= 1 keeps the scan stable."""
    if a.numel():
        check_values((a < 0).all(), f"{name} must be negative (A = -exp(A_log))",
                     lambda: f"values up to {a.max().item():g}")
