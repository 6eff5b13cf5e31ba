"""One decoding step of gated linear attention: one token per sequence, the state updated in a few
tensor ops (docs/math/gla.md, "One token"; docs/design.md, "The decoding step").

No packing, no chunks, no host synchronisation, static shapes; the returned state is a new tensor
(the one passed in stays valid). Differentiable by autograd.
"""

from __future__ import annotations

import torch

from seqmix.kernels import step_cpu
from seqmix.kernels.checks import check_key_value_step, check_tensor
from seqmix.kernels.sequences import reference_dtype


def gla_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor,
             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`seqmix.kernels.gla`: ``S' = diag(e^g) S + k v^T``, ``o = scale S'^T q``.

    Args:
        q: [B, H, K] the token's queries.
        k: [B, H, K] keys.
        v: [B, H, V] values.
        g: [B, H, K] log decays per key channel (<= 0; not checked: a check of values would synchronise).
        state: [B, H, K, V] the state before the token (float32 by convention).
        scale: multiplies the queries; defaults to ``K ** -0.5``.

    Returns:
        o: [B, H, V] in q's dtype.
        state: [B, H, K, V] after the token, float32 (float64 for float64 inputs); a new tensor.
    """
    check_key_value_step(q, k, v, state)
    check_tensor("g", g, q.shape, dims="[B, H, K]", like=q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if step_cpu.serves("gla_step", q, q, k, v, g, state):  # one C++ call
        return step_cpu.gla_step(q, k, v, g, state, scale)
    dt = reference_dtype(q)
    S = torch.addcmul(state.to(dt) * g.to(dt).exp().unsqueeze(-1), k.to(dt).unsqueeze(-1), v.to(dt).unsqueeze(-2))
    o = (q.to(dt).unsqueeze(-2) @ S).squeeze(-2) * scale
    return o.to(q.dtype), S
