"""Mamba-1's selective scan in plain PyTorch: the step-by-step oracle and the chunked form (docs/math/mamba.md).

Channels last: u, delta, z ``[B, T, D]``, A ``[D, N]``, B, C ``[B, T, N]`` or ``[B, T, G, N]``
(channel d reads group ``d // (D // G)``), optional D and delta_bias ``[D]``,
optional ``cu_seqlens`` (then B == 1). Computes in float32 (float64 for
float64 inputs) and returns ``(y [B, T, D] in u's dtype, final_state [Nseq, D, N]
or None)``. Both are differentiable by autograd; the recurrence is the oracle (in float64), the
chunked form the reference backend of :func:`seqmix.kernels.mamba.selective_scan`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqmix.kernels.library import autocast_off, forward_outputs
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


def _expand_groups(x, BC):
    """x [B, T, D] times the group's row of BC [B, T, G, N] per channel: [B, T, D, N]."""
    Bsz, T, Dm = x.shape
    G, N = BC.shape[-2:]
    return (x.view(Bsz, T, G, Dm // G, 1) * BC.view(Bsz, T, G, 1, N)).view(Bsz, T, Dm, N)


def _read_out(h, C):
    """sum_n h[..., d, n] C[..., group(d), n]: h [B, T, D, N], C [B, T, G, N] -> [B, T, D]."""
    Bsz, T, Dm, N = h.shape
    G = C.shape[2]
    return (h.view(Bsz, T, G, Dm // G, N) @ C.view(Bsz, T, G, N, 1)).view(Bsz, T, Dm)


def _in_chunks(x, chunk_size):
    """[B, T, ...] -> [B, NC, chunk_size, ...], the tail padded with zeros."""
    pad = (-x.shape[1]) % chunk_size
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    return x.view(x.shape[0], -1, chunk_size, *x.shape[2:])


def _two_level_scan(a, b, h_in, reverse=False):
    """x_t = a_t x_{t-1} + b_t over chunks, a, b [B, NC, c, S] (0 <= a <= 1), h_in [B, S] entering the first
    chunk; ``reverse``: x_t = a_t x_{t+1} + b_t from the last token, h_in after it. Three passes, each
    over every chunk at once: each chunk's end state from a zero start (and its decay, the product of its
    a), those carried from chunk to chunk, then the recurrence inside every chunk from its incoming state.
    Returns x [B, NC, c, S]."""
    a_t, b_t = a.unbind(2), b.unbind(2)
    order = range(len(a_t) - 1, -1, -1) if reverse else range(len(a_t))
    end = None
    for t in order:
        end = b_t[t] if end is None else torch.addcmul(b_t[t], a_t[t], end)
    decays, ends = a.prod(2).unbind(1), end.unbind(1)
    carried, h = [None] * len(ends), h_in
    for k in reversed(range(len(ends))) if reverse else range(len(ends)):
        carried[k] = h
        h = torch.addcmul(ends[k], decays[k], h)
    h, rows = torch.stack(carried, 1), [None] * len(a_t)
    for t in order:
        h = rows[t] = torch.addcmul(b_t[t], a_t[t], h)
    return torch.stack(rows, 2)


class _ChunkedScan(torch.autograd.Function):
    """The linear recurrence h_t = a_t h_{t-1} + b_t of :func:`_two_level_scan` with its gradient written out:
    G_t = dh_t + a_{t+1} G_{t+1} (the same scan backwards in time), db = G, da_t = G_t h_{t-1},
    dh_in = a_0 G_0: two scans in all, where autograd through the loops records and replays every step."""

    @staticmethod
    def forward(ctx, a, b, h_in):
        h = _two_level_scan(a, b, h_in)
        ctx.save_for_backward(a, h, h_in)
        return forward_outputs(h)

    @staticmethod
    @autocast_off
    def backward(ctx, dh):
        a, h, h_in = ctx.saved_tensors
        a_flat = a.flatten(1, 2)
        a_next = torch.cat([a_flat[:, 1:], torch.zeros_like(a_flat[:, :1])], 1).view_as(a)
        G = _two_level_scan(a_next, dh, torch.zeros_like(h_in), reverse=True).flatten(1, 2)
        h_prev = torch.cat([h_in[:, None], h.flatten(1, 2)[:, :-1]], 1)
        return (G * h_prev).view_as(a), G.view_as(a), a_flat[:, 0] * G[:, 0]


@autocast_off
def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=32):
    """The same scan as :func:`selective_scan_recurrent` by chunks of ``chunk_size`` tokens
    (docs/math/mamba.md, "The chunked reference"): the token loop runs over one chunk's length with
    every chunk of every sequence at once, and the state passes once per chunk. Packed sequences
    run as one: the state is reset at each sequence's first token, which takes its initial state."""
    Bsz, T, Dm = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(2), C.unsqueeze(2)
    N = B.shape[-1]
    cd = reference_dtype(u)
    in_dtype = u.dtype
    u, delta, A, B, C, D, z, delta_bias = (None if t is None else t.to(cd)
                                          for t in (u, delta, A, B, C, D, z, delta_bias))
    delta = process_delta(delta, delta_bias, delta_softplus)
    log_a = delta[..., None] * A  # [B, T, D, N], <= 0
    b = _expand_groups(delta * u, B)
    h0 = None if initial_state is None else initial_state.to(cd)
    c = max(1, min(chunk_size, T))
    reset = h_in = None
    if cu_seqlens is None:
        h_in = u.new_zeros(Bsz, Dm, N) if h0 is None else h0
    else:
        bounds = cu_seqlens.to(device=u.device, dtype=torch.int64)
        lengths = bounds[1:] - bounds[:-1]
        first = bounds[:-1][lengths > 0]
        reset = torch.zeros(T, dtype=torch.bool, device=u.device).index_fill(0, first, True)
        h_in = u.new_zeros(1, Dm, N)
        if h0 is not None:  # the first token's update starts from the sequence's initial state
            b = b.index_add(1, first, torch.exp(log_a[:, first]) * h0[lengths > 0][None])
    a = torch.exp(log_a)
    if reset is not None:  # the state before a sequence's first token does not carry into it
        a = a.masked_fill(reset[None, :, None, None], 0.0)
    # Padded tokens have a = 1 and b = 0: they keep the state.
    a = F.pad(a, (0, 0, 0, 0, 0, (-T) % c), value=1.0)
    h = _ChunkedScan.apply(_in_chunks(a.flatten(2), c), _in_chunks(b.flatten(2), c), h_in.flatten(1))
    final = h[:, -1, -1].view(-1, Dm, N)
    h = h.flatten(1, 2)[:, :T].view(Bsz, T, Dm, N)
    y = _read_out(h, C)
    if cu_seqlens is not None:
        last = h[0, (bounds[1:] - 1).clamp(min=0)]
        empty = h0 if h0 is not None else torch.zeros_like(last)
        final = torch.where((lengths > 0)[:, None, None], last, empty)
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * F.silu(z)
    return y.to(in_dtype), (final if output_final_state else None)
