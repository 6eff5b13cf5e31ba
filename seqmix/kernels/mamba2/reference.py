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


def _carry(decay, increments, first):
    """``X_{n+1} = decay_n X_n + increments_n`` from ``X_0 = first``, one chunk at a time: decay [..., NC],
    increments [..., NC, P, N], first [..., P, N]; returns every X_n, [..., NC + 1, P, N]. The backward's
    reverse carry is the same with the chunks reversed."""
    *lead, NC, P, N = increments.shape
    out = increments.new_empty(*lead, NC + 1, P, N)
    out[..., 0, :, :] = first
    for n in range(NC):
        torch.addcmul(increments[..., n, :, :], out[..., n, :, :], decay[..., n, None, None],
                      out=out[..., n + 1, :, :])
    return out


class _SSDChunks(torch.autograd.Function):
    """The chunked SSD form with a hand-written backward (docs/math/mamba2.md, "The CPU reference"):
    per chunk the masked decay matrix times C B^T, the incoming state's contribution, and the state carry.

    x [Bb, G, Hg, NC, c, P], dt [Bb, G, Hg, NC, c] (dt' already processed), A [G, Hg, 1, 1],
    B, C [Bb, G, 1, NC, c, N], h0 [Bb, G, Hg, P, N], all in the compute dtype. Returns y without D
    [Bb, G, Hg, NC, c, P] and the final state [Bb, G, Hg, P, N]."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0):
        lcum = (dt * A).cumsum(-1)
        c = x.shape[-2]
        causal = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()
        # exp only of differences i >= j (<= 0); the masked ones are set to -inf first, never exponentiated.
        L = torch.exp((lcum[..., :, None] - lcum[..., None, :]).masked_fill_(~causal, float("-inf")))
        W = L * (C @ B.transpose(-1, -2))
        xdt = x * dt[..., None]
        last = lcum[..., -1:]
        states = _carry(last[..., 0].exp(), (xdt * torch.exp(last - lcum)[..., None]).transpose(-1, -2) @ B, h0)
        y_in = torch.exp(lcum)[..., None] * (C @ states[..., :-1, :, :].transpose(-1, -2))
        ctx.save_for_backward(x, dt, A, B, C, L, W, states, y_in)
        return y_in + W @ xdt, states[..., -1, :, :].clone()

    @staticmethod
    def backward(ctx, dy, dh_last):
        x, dt, A, B, C, L, W, states, y_in = ctx.saved_tensors
        lcum = (dt * A).cumsum(-1)
        last = lcum[..., -1:]
        decay, to_end, el = last[..., 0].exp(), torch.exp(last - lcum)[..., None], torch.exp(lcum)[..., None]
        xdt = x * dt[..., None]
        # Gradients of the states leaving each chunk, carried from the last chunk back.
        back = _carry(decay.flip(-1), ((el * dy).transpose(-1, -2) @ C).flip(-3), dh_last).flip(-3)
        dS, dh0 = back[..., 1:, :, :], back[..., 0, :, :]
        h = states[..., :-1, :, :]
        dW = dy @ xdt.transpose(-1, -2)
        # Contributions to the state at the chunk's end: u = xdt exp(last - lcum), contrib = u^T B.
        u = xdt * to_end
        du = B @ dS.transpose(-1, -2)
        dxdt = (W.transpose(-1, -2) @ dy).add_(du * to_end)
        dCB = (dW * L).sum(2, keepdim=True)
        dC = (dCB @ B).add_(((el * dy) @ h).sum(2, keepdim=True))
        dB = (dCB.transpose(-1, -2) @ C).add_((u @ dS).sum(2, keepdim=True))
        # dlcum: +lcum_i and -lcum_j through W (its diagonal cancels exactly: left out), +lcum_i through y_in,
        # -lcum_j through u (the last token's exp(0) has none) and the chunk's total decay, last, through the
        # states it multiplies and u; dlast = sum(dS * h_leaving) less the last token's own term.
        E = (dW * W).tril_(-1)
        through_u = (du * u).sum(-1)
        through_u[..., -1] = 0
        dlcum = E.sum(-1) - E.sum(-2) + (dy * y_in).sum(-1) - through_u
        dlast = (dS * states[..., 1:, :, :]).sum((-1, -2)) - (du[..., -1, :] * u[..., -1, :]).sum(-1)
        da = (dlcum - dlcum.cumsum(-1)).add_(dlcum.sum(-1, keepdim=True) + dlast[..., None])
        ddt = (dxdt * x).sum(-1).add_(da * A)
        dA = (da * dt).sum((0, 3, 4)).view_as(A)
        return dxdt * dt[..., None], ddt, dA, dB, dC, dh0


def _chunked_dense(x, dt, A, B, C, h, chunk_size):
    """The chunked SSD form (docs/math/mamba2.md) of dense inputs, every chunk of every row at once:
    x [Bb, T, H, P], dt [Bb, T, H] (processed), B, C [Bb, T, G, N] (head h reads group h // (H / G)),
    h [Bb, H, P, N] entering. C B^T is formed once per group, not per head. Only the state carry runs chunk
    by chunk. Returns (y without D [Bb, T, H, P], h_final)."""
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
    x = x.reshape(Bb, NC, c, G, H // G, P).permute(0, 3, 4, 1, 2, 5).contiguous()
    dt = dt.reshape(Bb, NC, c, G, H // G).permute(0, 3, 4, 1, 2).contiguous()
    B, C = (t.reshape(Bb, NC, c, G, 1, N).permute(0, 3, 4, 1, 2, 5).contiguous() for t in (B, C))
    y, h = _SSDChunks.apply(x, dt, A.view(G, H // G, 1, 1), B, C, h.reshape(Bb, G, H // G, P, N))
    y = y.permute(0, 3, 4, 1, 2, 5).contiguous().view(Bb, NC * c, H, P)[:, :T]
    return y, h.reshape(Bb, H, P, N)


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
