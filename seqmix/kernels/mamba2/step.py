"""One decoding step of Mamba-2's SSD: one token per sequence, the state updated in a few tensor ops
(docs/math/mamba2.md, "One token"; docs/design.md, "The decoding step").

No packing, no chunks, no host synchronisation, static shapes; the returned state is a new tensor
(the one passed in stays valid). Differentiable by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqmix.kernels import step_cpu
from seqmix.kernels.checks import check_tensor
from seqmix.kernels.mamba2.reference import process_dt
from seqmix.kernels.sequences import reference_dtype


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             state: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
             dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
             dt_limit: tuple[float, float] = (0.0, float("inf"))) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`seqmix.kernels.ssd`: ``h' = exp(dt' A) h + dt' x B^T``, ``y = h' C + D x``,
    ``y *= silu(z)``, with ``dt' = clamp(softplus?(dt + dt_bias), *dt_limit)``.

    Args:
        x: [Bsz, H, P] the token's inputs.
        dt: [Bsz, H] step sizes (before bias, softplus and clamp).
        A: [H] negative decay rates.
        B: [Bsz, G, N] input projections; G divides H (head h reads group h // (H / G)).
        C: [Bsz, G, N] output projections.
        state: [Bsz, H, P, N] the state before the token (float32 by convention).
        D: [H] skip, or None. z: [Bsz, H, P] gate, or None. dt_bias: [H] or None.
        dt_softplus, dt_limit: as :func:`seqmix.kernels.ssd`.

    Returns:
        y: [Bsz, H, P] in x's dtype.
        state: [Bsz, H, P, N] after the token, float32 (float64 for float64 inputs); a new tensor.
    """
    check_tensor("x", x, (None, None, None), dims="[Bsz, H, P]")
    Bsz, H, P = x.shape
    check_tensor("dt", dt, (Bsz, H), dims="[Bsz, H]", like=x)
    check_tensor("A", A, (H,), dims="[H]", like=x)
    check_tensor("B", B, (Bsz, None, None), dims="[Bsz, G, N]", like=x)
    G, N = B.shape[1:]
    if G == 0 or H % G:
        raise ValueError(f"B's groups G={G} must divide the heads H={H}")
    check_tensor("C", C, (Bsz, G, N), dims="[Bsz, G, N]", like=x)
    check_tensor("state", state, (Bsz, H, P, N), dims="[Bsz, H, P, N]", like=x)
    if step_cpu.serves("ssd_step", x, x, dt, A, B, C, state, D, z, dt_bias):  # one C++ call
        return step_cpu.ssd_step(x, dt, A, B, C, state, D, z, dt_bias, dt_softplus, dt_limit)
    cd = reference_dtype(x)
    dt = process_dt(dt.to(cd), None if dt_bias is None else dt_bias.to(cd), dt_softplus, dt_limit)  # [Bsz, H]
    xc = x.to(cd)
    # Heads grouped as [Bsz, G, H / G, ...]: B and C reach a group's heads by broadcasting, and y is one
    # [(H / G) P, N] x [N] product per group.
    Hg = H // G
    h = torch.addcmul(state.to(cd).view(Bsz, G, Hg, P, N) * (dt * A.to(cd)).exp().view(Bsz, G, Hg, 1, 1),
                      (dt[..., None] * xc).view(Bsz, G, Hg, P, 1), B.to(cd).view(Bsz, G, 1, 1, N))
    y = torch.bmm(h.view(Bsz * G, Hg * P, N), C.to(cd).reshape(Bsz * G, N, 1)).view(Bsz, H, P)
    if D is not None:
        y = torch.addcmul(y, D.to(cd)[:, None], xc)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype), h.view(Bsz, H, P, N)
