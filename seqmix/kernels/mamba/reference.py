"""Mamba-1's selective scan in plain PyTorch: the recurrence, one token at a time (docs/math/mamba.md).

Channels last: u, delta, z ``[B, T, D]``, A ``[D, N]``, B, C ``[B, T, N]`` or ``[B, T, G, N]``
(channel d reads group ``d // (D // G)``), optional D and delta_bias ``[D]``,
optional ``cu_seqlens`` (then B == 1). Computes in float32 (float64 for
float64 inputs) and returns ``(y [B, T, D] in u's dtype, final_state [Nseq, D, N]
or None)``. Differentiable by autograd: it is both the oracle (in float64) and
the reference backend of :func:`seqmix.kernels.mamba.selective_scan`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqmix.kernels.sequences import over_sequences, reference_dtype


def process_delta(delta, delta_bias, delta_softplus: bool):
    """delta' = softplus?(delta + delta_bias)."""
    if delta_bias is not None:
        delta = delta + delta_bias
    return F.softplus(delta) if delta_softplus else delta


def selective_scan_recurrent(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             initial_state=None, output_final_state=False, cu_seqlens=None):
    """``h_t = exp(delta'_t A) h_{t-1} + delta'_t u_t B_t``, ``y_t = h_t C_t + D u_t``, ``y *= silu(z)``
    (per channel d: h is [N], ``exp`` elementwise)."""
    Bsz, T, Dm = u.shape
    if B.dim() == 3:  # [B, T, N]: one group
        B, C = B.unsqueeze(2), C.unsqueeze(2)
    G, N = B.shape[-2:]
    cd = reference_dtype(u)
    in_dtype = u.dtype
    u, delta, A, B, C, D, z, delta_bias = (None if t is None else t.to(cd)
                                          for t in (u, delta, A, B, C, D, z, delta_bias))
    delta = process_delta(delta, delta_bias, delta_softplus)
    B = B.repeat_interleave(Dm // G, dim=2)  # [B, T, D, N]
    C = C.repeat_interleave(Dm // G, dim=2)

    def run(b, s, e, h):
        rows = []
        for t in range(s, e):
            h = torch.exp(delta[b, t, :, None] * A) * h + (delta[b, t] * u[b, t])[:, None] * B[b, t]
            rows.append((h * C[b, t]).sum(-1))
        return (torch.stack(rows) if rows else u.new_zeros(0, Dm)), h

    y, final = over_sequences(run, Bsz, T, cu_seqlens, initial_state, u.new_zeros(Dm, N), cd)
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * F.silu(z)
    return y.to(in_dtype), (final if output_final_state else None)
