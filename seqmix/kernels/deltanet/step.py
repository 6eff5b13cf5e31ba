"""One decoding step of the delta rule and the gated delta rule: one token per sequence, the state
updated in a handful of tensor ops (docs/math/deltanet.md, "One token"; docs/design.md, "The decoding step").

No packing, no chunks, no host synchronisation and static shapes, so ``torch.compile(fullgraph=True)``
traces it and a CUDA graph can capture it. The state is not written in place: the returned state is a
new tensor and the one passed in stays valid (a caller may continue it more than once, as
``recurrent_depth``'s bounded mode does). Differentiable by autograd.
"""

from __future__ import annotations

import torch

from seqmix.kernels import step_cpu
from seqmix.kernels.checks import check_key_value_step
from seqmix.kernels.sequences import in_dtype, reference_dtype


def _columns(x):
    """[B, H] -> [B, H, 1, 1] in one view."""
    return x.view(x.shape + (1, 1))


def _step(q, k, v, beta, g, state, scale):
    """The shared update; ``g`` [B, H] or None (no decay). Computes in float32 (float64 for float64 q)."""
    if step_cpu.serves("delta_rule_step", q, q, k, v, beta, g, state):  # one C++ call
        return step_cpu.delta_rule_step(q, k, v, beta, g, state, scale)
    dt = reference_dtype(q)
    S = in_dtype(state, dt)
    if g is not None:
        S = S * _columns(in_dtype(g, dt).exp())
    k = in_dtype(k, dt).unsqueeze(-2)  # rows [B, H, 1, *]: every product is one matmul
    v_new = (in_dtype(v, dt).unsqueeze(-2) - k @ S) * _columns(in_dtype(beta, dt))  # [B, H, 1, V]
    S = torch.addcmul(S, k.transpose(-1, -2), v_new)  # S + k v_new^T
    o = (in_dtype(q, dt).unsqueeze(-2) @ S).squeeze(-2) * scale
    return in_dtype(o, q.dtype), S


def delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
                    scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`seqmix.kernels.delta_rule`:
    ``S' = S + beta k (v - S^T k)^T``, ``o = scale S'^T q``.

    Args:
        q: [B, H, K] the token's queries.
        k: [B, H, K] keys.
        v: [B, H, V] values.
        beta: [B, H] write strengths.
        state: [B, H, K, V] the state before the token (float32 by convention).
        scale: multiplies the queries; defaults to ``K ** -0.5``.

    Returns:
        o: [B, H, V] in q's dtype.
        state: [B, H, K, V] after the token, float32 (float64 for float64 inputs); a new tensor.
    """
    check_key_value_step(q, k, v, state, beta=beta)
    return _step(q, k, v, beta, None, state, q.shape[-1] ** -0.5 if scale is None else scale)


def gated_delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                          state: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`seqmix.kernels.gated_delta_rule`:
    ``S' = e^g S + beta k (v - e^g S^T k)^T``, ``o = scale S'^T q``.

    Args:
        q: [B, H, K] the token's queries.
        k: [B, H, K] keys.
        v: [B, H, V] values.
        g: [B, H] log decays (<= 0; not checked here: a check of values would synchronise the host).
        beta: [B, H] write strengths.
        state: [B, H, K, V] the state before the token (float32 by convention).
        scale: multiplies the queries; defaults to ``K ** -0.5``.

    Returns:
        o: [B, H, V] in q's dtype.
        state: [B, H, K, V] after the token, float32 (float64 for float64 inputs); a new tensor.
    """
    check_key_value_step(q, k, v, state, g=g, beta=beta)
    return _step(q, k, v, beta, g, state, q.shape[-1] ** -0.5 if scale is None else scale)
