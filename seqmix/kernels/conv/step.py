"""One decoding step of LightConv / DynamicConv's causal conv: one token per sequence against the last
K-1 inputs (docs/design.md, "The decoding step"). The short causal conv's step is
:func:`seqmix.kernels.causal_conv1d_update`.

No host synchronisation, static shapes; the returned state is a new tensor (the one passed in stays
valid). Differentiable by autograd.
"""

from __future__ import annotations

import torch

from seqmix.kernels.checks import check_tensor


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
        state: [B, C, K-1] after the token, in state's dtype; a new tensor.
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
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    window = torch.cat([state.to(dt), x.to(dt).unsqueeze(-1)], -1)  # [B, C, K]
    w = weight.to(dt).softmax(-1) if weight_softmax else weight.to(dt)
    y = (window.view(B, H, C // H, K) @ w.unsqueeze(-1)).view(B, C)
    return y.to(x.dtype), window[..., 1:].to(state.dtype)
