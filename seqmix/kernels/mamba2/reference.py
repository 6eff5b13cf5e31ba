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

from seqmix.kernels.sequences import over_sequences, reference_dtype, sequence_spans


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


def _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, expand=True):
    """Inputs in the compute dtype, dt processed, B and C expanded from groups to heads (if ``expand``)."""
    cd = reference_dtype(x)
    x, dt, A, B, C, D, z, dt_bias = (None if t is None else t.to(cd) for t in (x, dt, A, B, C, D, z, dt_bias))
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    if expand:
        heads_per_group = x.shape[2] // B.shape[2]
        B, C = B.repeat_interleave(heads_per_group, 2), C.repeat_interleave(heads_per_group, 2)
    return cd, x, dt, A, B, C, D, z


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


def _chunked_dense(x, dt, A, B, C, h, chunk_size):
    """The chunked SSD form (docs/math/mamba2.md) of dense inputs, every chunk of every row at once:
    x [Bb, T, H, P], dt [Bb, T, H], B, C [Bb, T, G, N] (head h reads group h // (H / G)), h [Bb, H, P, N]
    entering. C B^T is formed once per group, not per head. Only the state carry runs chunk by chunk.
    Returns (y without D [Bb, T, H, P], h_final)."""
    Bb, T, H, P = x.shape
    G, N = B.shape[2:]
    c = max(1, min(chunk_size, T))
    pad = (-T) % c
    if pad:  # dt = 0 on the padded tokens: no decay and no contribution; their outputs are cut off below
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    NC = x.shape[1] // c
    if NC == 0:
        return x.new_zeros(Bb, 0, H, P), h
    # group and head first: [Bb, G, H / G, NC, c, *]; B and C with one head axis to broadcast
    x = x.reshape(Bb, NC, c, G, H // G, P).permute(0, 3, 4, 1, 2, 5)
    dt = dt.reshape(Bb, NC, c, G, H // G).permute(0, 3, 4, 1, 2)
    B, C = (t.reshape(Bb, NC, c, G, 1, N).permute(0, 3, 4, 1, 2, 5) for t in (B, C))
    lcum = torch.cumsum(dt * A.view(G, H // G, 1, 1), -1)  # log-decay from each chunk's start
    causal = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()
    # exp only of differences i >= j (<= 0); the masked ones are set to -inf first, never exponentiated.
    M = torch.exp((lcum[..., :, None] - lcum[..., None, :]).masked_fill(~causal, float("-inf")))
    xdt = dt[..., None] * x
    y = (M * (C @ B.transpose(-1, -2))) @ xdt
    # Each chunk's own contribution to the state at its end, all chunks at once.
    contrib = (xdt * torch.exp(lcum[..., -1:] - lcum)[..., None]).transpose(-1, -2) @ B  # [Bb, G, Hg, NC, P, N]
    states = []
    h = h.view(Bb, G, H // G, P, N)
    for decay, contrib_k in zip(torch.exp(lcum[..., -1]).unbind(3), contrib.unbind(3), strict=True):
        states.append(h)
        h = decay[..., None, None] * h + contrib_k
    y = y + torch.exp(lcum)[..., None] * (C @ torch.stack(states, 3).transpose(-1, -2))
    return y.permute(0, 3, 4, 1, 2, 5).reshape(Bb, NC * c, H, P)[:, :T], h.reshape(Bb, H, P, N)


def ssd_chunked(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64):
    """The chunked SSD form: per chunk the masked decay matrix exp(lcum_i - lcum_j) times C B^T,
    plus the incoming state's contribution; states pass from chunk to chunk. A dense batch runs
    as one; packed sequences one after another."""
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    in_dtype = x.dtype
    cd, x, dt, A, B, C, D, z = _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, expand=False)
    if cu_seqlens is None:
        h = x.new_zeros(Bsz, H, P, N) if initial_state is None else initial_state.to(cd)
        y, final = _chunked_dense(x, dt, A, B, C, h, chunk_size)
    else:
        outs, finals = [], []
        for n, (_, s, e) in enumerate(sequence_spans(cu_seqlens, Bsz, T)):
            h = x.new_zeros(1, H, P, N) if initial_state is None else initial_state[n : n + 1].to(cd)
            y_n, h = _chunked_dense(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], h, chunk_size)
            outs.append(y_n)
            finals.append(h)
        y, final = torch.cat(outs, 1), torch.cat(finals)
    return _finish(y, x, D, z, final, in_dtype, output_final_state)
