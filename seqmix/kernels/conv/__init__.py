"""Convolutions: the short causal depthwise conv used inside the recurrent mixers."""

from __future__ import annotations

import torch

from seqmix.kernels.backend import select_backend
from seqmix.kernels.checks import check_cu_seqlens, check_tensor
from seqmix.kernels.conv.reference import causal_conv1d_reference

__all__ = ["causal_conv1d", "causal_conv1d_reference"]

ACTIVATIONS = (None, "silu")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal convolution of any width W:
    ``out[t, d] = act(bias[d] + sum_j weight[d, j] * x[t - (W-1) + j, d])``.

    ``weight[:, -1]`` multiplies the current token, as ``F.conv1d`` with W-1 zeros
    of left padding; before a sequence's first token the taps read the state.

    Args:
        x: [B, T, D] inputs.
        weight: [D, W] per-channel taps.
        bias: [D] or None.
        activation: None or ``"silu"``.
        initial_state: [N, D, W-1], the last W-1 inputs before each sequence, oldest first.
        output_final_state: also return the state after the last token.
        cu_seqlens: [N+1] boundaries of sequences packed as ``[1, sum(T_i), D]``.
        backend: None (automatic) or ``"reference"``.

    Returns:
        out: [B, T, D] in x's dtype.
        final_state: [N, D, W-1] float32 (float64 for float64 inputs), or None.
    """
    check_tensor("x", x, (None, None, None), dims="[B, T, D]")
    B, T, D = x.shape
    check_tensor("weight", weight, (D, None), dims="[D, W]", like=x)
    W = weight.shape[1]
    if W < 1:
        raise ValueError(f"weight must have shape [D, W] with W >= 1, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, (D,), dims="[D]", like=x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    n = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, batch=B, total=T, like=x)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, (n, D, W - 1), dims="[N, D, W-1]", like=x)
    select_backend("causal_conv1d", backend, x.device, ("reference",))
    return causal_conv1d_reference(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens)
