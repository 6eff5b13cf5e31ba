"""One decoding step of the causal convs: one token per sequence against the last K-1 inputs
(docs/design.md, "The decoding step"). :func:`seqmix.kernels.causal_conv1d_update` (the short conv's step,
in place) computes one token on the reference backend with :func:`causal_conv1d_step`.

No host synchronisation, static shapes; the returned state is a new tensor (the one passed in stays
valid). Differentiable by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqmix.kernels import step_cpu
from seqmix.kernels.checks import check_tensor
from seqmix.kernels.sequences import in_dtype, reference_dtype


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                       state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`seqmix.kernels.causal_conv1d`: ``out = act(bias + sum_j weight[:, j] window[:, j])``
    over the window of the state's W-1 inputs followed by x (a product and a sum: no ``F.conv1d``, whose
    set-up costs more than the arithmetic of one token). Arguments are checked by the caller
    (:func:`seqmix.kernels.causal_conv1d_update`).

    Args:
        x: [B, D] the token's inputs.
        weight: [D, W]; bias: [D] or None; activation: None or ``"silu"``.
        state: [B, D, W-1] the last W-1 inputs, oldest first.

    Returns:
        out: [B, D] in x's dtype.
        state: [B, D, W-1] after the token, float32 (float64 for float64 inputs); a new tensor, or a view of one.
    """
    if step_cpu.serves("causal_conv1d_step", x, x, weight, bias, state):  # one C++ call
        return step_cpu.causal_conv1d_step(x, weight, bias, activation == "silu", state)
    dt = reference_dtype(x)
    window = torch.cat([in_dtype(state, dt), in_dtype(x, dt).unsqueeze(-1)], -1)  # [B, D, W]
    out = (window * in_dtype(weight, dt)).sum(-1)
    if bias is not None:
        out = out + in_dtype(bias, dt)
    if activation == "silu":
        out = F.silu(out)
    return in_dtype(out, x.dtype), window[..., 1:]


def dynamic_conv_step(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, weight_softmax: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the causal :func:`seqmix.kernels.dynamic_conv` (or :func:`~seqmix.kernels.light_conv` for
    a weight [H, K]) with no DropConnect: ``y[c] = sum_j w[h(c), j] window[c, j]``, where the window is the
    K-1 inputs of ``state`` followed by x, and h(c) = c // (C / H).

    Args:
        x: [B, C] the token's inputs.
        weight: [H, K] (light) or [B, H, K] (this token's dynamic kernels); logits when ``weight_softmax``.
        state: [B, C, K-1] the last K-1 inputs of each sequence, oldest first.
        weight_softmax: normalise the kernels with a softmax over the K taps.

    Returns:
        y: [B, C] in x's dtype.
        state: [B, C, K-1] after the token, float32 (float64 for float64 inputs); a new tensor.
    """
    check_tensor("x", x, (None, None), dims="[B, C]")
    B, C = x.shape
    if weight.dim() == 2:
        weight = weight.unsqueeze(0)
    check_tensor("weight", weight, (None, None, None), dims="[H, K] or [B, H, K]", like=x)
    H, K = weight.shape[1:]
    if weight.shape[0] not in (1, B) or H == 0 or C % H:
        raise ValueError(f"weight must have shape [H, K] or [B={B}, H, K] with H dividing C={C}, "
                         f"got {tuple(weight.shape)}")
    check_tensor("state", state, (B, C, K - 1), dims="[B, C, K-1]", like=x)
    dt = reference_dtype(x)
    window = torch.cat([state.to(dt), x.to(dt).unsqueeze(-1)], -1)  # [B, C, K]
    w = weight.to(dt).softmax(-1) if weight_softmax else weight.to(dt)
    y = (window.view(B, H, C // H, K) @ w.unsqueeze(-1)).view(B, C)
    return y.to(x.dtype), window[..., 1:]
