"""Mamba-2's state-space duality (SSD) in plain PyTorch: the step-by-step oracle and the chunked form.

Both take the op's layout (x ``[B, T, H, P]``, dt ``[B, T, H]``, A ``[H]``,
B, C ``[B, T, G, N]``, optional D ``[H]``, z ``[B, T, H, P]``) with optional
``cu_seqlens`` (then B == 1), compute in float32 (float64 for float64 inputs)
and return ``(y [B, T, H, P] in x's dtype, final_state [Nseq, H, P, N] or None (Nseq sequences))``.
Both are differentiable by autograd; the chunked form is the reference
backend of :func:`seqmix.kernels.mamba2.ssd`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqmix.kernels.sequences import over_sequences, reference_dtype


def process_dt(dt, dt_bias, dt_softplus: bool, dt_limit: tuple[float, float]):
    """dt' = clamp(softplus?(dt + dt_bias), *dt_limit), in dt's dtype (the caller upcasts first).

    The clamp always applies, so dt' >= 0 and every decay exp(dt' A) is at most 1.
    """
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(*dt_limit)


def _gate(y, z):
    return y if z is None else y * F.silu(z)


def _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit):
    """Inputs in the compute dtype, dt processed, B and C expanded from groups to heads."""
    cd = reference_dtype(x)
    x, dt, A, B, C, D, z, dt_bias = (None if t is None else t.to(cd) for t in (x, dt, A, B, C, D, z, dt_bias))
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    heads_per_group = x.shape[2] // B.shape[2]
    return cd, x, dt, A, B.repeat_interleave(heads_per_group, 2), C.repeat_interleave(heads_per_group, 2), D, z


def _finish(y, x, D, z, final, in_dtype, output_final_state):
    if D is not None:
        y = y + D[:, None] * x
    return _gate(y, z).to(in_dtype), (final if output_final_state else None)


def ssd_recurrent(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                  initial_state=None, output_final_state=False, cu_seqlens=None):
    """``h_t = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T``, ``y_t = h_t C_t + D x_t``, one token at a time."""
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    in_dtype = x.dtype
    cd, x, dt, A, B, C, D, z = _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)

    def run(b, s, e, h):
        rows = []
        for t in range(s, e):
            decay = torch.exp(dt[b, t] * A)
            h = decay[:, None, None] * h + (dt[b, t][:, None] * x[b, t])[:, :, None] * B[b, t][:, None, :]
            rows.append(torch.einsum("hpn,hn->hp", h, C[b, t]))
        return (torch.stack(rows) if rows else x.new_zeros(0, H, P)), h

    y, final = over_sequences(run, Bsz, T, cu_seqlens, initial_state, x.new_zeros(H, P, N), cd)
    return _finish(y, x, D, z, final, in_dtype, output_final_state)


def _chunked_sequence(x, dt, A, B, C, h, chunk_size):
    """One sequence in the chunked SSD form (docs/math/mamba2.md): x [T, H, P], dt [T, H],
    B, C [T, H, N] (already expanded to heads), h [H, P, N]. Returns (y without D, h_final)."""
    T = x.shape[0]
    outs = []
    for s in range(0, T, chunk_size):
        xc, dtc, Bc, Cc = (t[s : s + chunk_size].transpose(0, 1) for t in (x, dt, B, C))  # head first
        lcum = torch.cumsum(dtc * A[:, None], -1)  # [H, c]: log-decay from the chunk start
        diff = lcum[:, :, None] - lcum[:, None, :]
        causal = torch.ones_like(diff, dtype=torch.bool).tril()
        # exp only of differences i >= j (<= 0); the masked ones are set to -inf first, never exponentiated.
        M = torch.exp(diff.masked_fill(~causal, float("-inf")))
        scores = M * (Cc @ Bc.transpose(-1, -2))
        y = scores @ (dtc[..., None] * xc) + torch.exp(lcum)[..., None] * (Cc @ h.transpose(-1, -2))
        decay_to_end = torch.exp(lcum[:, -1:] - lcum)  # [H, c]
        h = torch.exp(lcum[:, -1])[:, None, None] * h + (xc * (decay_to_end * dtc)[..., None]).transpose(-1, -2) @ Bc
        outs.append(y.transpose(0, 1))
    return (torch.cat(outs) if outs else x.new_zeros(0, *x.shape[1:])), h


def ssd_chunked(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64):
    """The chunked SSD form: per chunk the masked decay matrix exp(lcum_i - lcum_j) times C B^T,
    plus the incoming state's contribution; states pass from chunk to chunk."""
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    in_dtype = x.dtype
    cd, x, dt, A, B, C, D, z = _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)

    def run(b, s, e, h):
        return _chunked_sequence(x[b, s:e], dt[b, s:e], A, B[b, s:e], C[b, s:e], h, chunk_size)

    y, final = over_sequences(run, Bsz, T, cu_seqlens, initial_state, x.new_zeros(H, P, N), cd)
    return _finish(y, x, D, z, final, in_dtype, output_final_state)
