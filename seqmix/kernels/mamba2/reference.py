"""Mamba-2's state-space duality (SSD) in plain PyTorch: the step-by-step oracle and the chunked form.

Both take the op's layout (x ``[B, T, H, P]``, dt ``[B, T, H]``, A ``[H]``,
B, C ``[B, T, G, N]``, optional D ``[H]``, z ``[B, T, H, P]``) with optional
``cu_seqlens`` (then B == 1), compute in float32 (float64 for float64 inputs)
and return ``(y [B, T, H, P] in x's dtype, final_state [Nseq, H, P, N] or None (Nseq sequences))``.
Both are differentiable (the recurrence by autograd, the chunked form by a hand-written backward);
the chunked form is the reference backend of :func:`seqmix.kernels.mamba2.ssd`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqmix.kernels.gated_linear_attention.reference import factored_limit
from seqmix.kernels.library import autocast_off, forward_outputs
from seqmix.kernels.sequences import over_sequences, reference_dtype, sequence_spans


def process_dt(dt, dt_bias, dt_softplus: bool, dt_limit: tuple[float, float]):
    """dt' = clamp(softplus?(dt + dt_bias), *dt_limit), in dt's dtype (the caller upcasts first).

    The clamp always applies, so dt' >= 0 and every decay exp(dt' A) is at most 1.
    """
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
        if dt_limit[0] <= 0 and dt_limit[1] == float("inf"):
            return dt  # softplus is >= 0 already: the clamp would change nothing
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
        y = torch.addcmul(y, D[:, None], x)  # one pass (a product, then a sum, measured ~3x the time)
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


class _SSDChunks(torch.autograd.Function):
    """The chunked SSD form with a hand-written backward (docs/math/mamba2.md, "The CPU reference").

    Everything stays in the tokens' own layout, with the heads of a group side by side: per chunk, the state
    terms of all heads of a group are one matmul of ``[c, N]`` by ``[N, (H / G) P]`` (no copy of B or C per
    head, and the sums over a group's heads happen inside the matmuls); only the decay-masked ``C B^T``
    differs per head.

    x [Bb, T, H, P], dt [Bb, T, H] (dt' already processed), A [H], B, C [Bb, T, G, N], h0 [Bb, H, P, N],
    in the compute dtype, T a multiple of ``c``. Returns y without D [Bb, T, H, P] and the final state.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, c):
        Bb, T, H, P = x.shape
        G, N = B.shape[2:]
        NC, Hg = T // c, H // G
        X, dtc, Bm, Cm, lcum = _chunk_views(x, dt, A, B, C, c)
        L, W, xdt = _SSDChunks._intra(X, dtc, Bm, Cm, lcum)
        last = lcum[:, :, :, -1:]
        u = X * (dtc * torch.exp(last - lcum))[..., None]  # each token's write to the chunk's final state
        entering, final = _carry(torch.exp(last[:, :, :, 0]),
                                 (u.flatten(-2).transpose(-1, -2) @ Bm).view(Bb, G, NC, Hg, P, N),
                                 h0.view(Bb, G, Hg, P, N))
        y_in = (Cm @ entering.flatten(3, 4).transpose(-1, -2)).view(Bb, G, NC, c, Hg, P)
        y_in.mul_(torch.exp(lcum)[..., None])
        y = y_in + (W @ xdt).transpose(3, 4)
        ctx.save_for_backward(X, dtc, A, Bm, Cm, lcum, L, W, xdt, y_in, entering)
        return forward_outputs(_to_tokens(y), final.view(Bb, H, P, N))

    @staticmethod
    def _intra(X, dtc, Bm, Cm, lcum):
        """The decay mask L and W = L * C B^T per head [Bb, G, NC, Hg, c, c], and dt' x head-major
        [Bb, G, NC, Hg, c, P] (one batched matmul per chunk and head for W's products)."""
        c = X.shape[3]
        lh = lcum.transpose(-1, -2)
        causal = torch.ones(c, c, dtype=torch.bool, device=X.device).tril()
        # exp only of differences i >= j (<= 0); the masked ones are set to -inf first, never exponentiated.
        L = torch.exp((lh[..., :, None] - lh[..., None, :]).masked_fill_(~causal, float("-inf")))
        W = L * (Cm @ Bm.transpose(-1, -2)).unsqueeze(3)
        xdt = torch.empty_like(X.transpose(3, 4), memory_format=torch.contiguous_format)
        torch.mul(X.transpose(3, 4), dtc.transpose(-1, -2)[..., None], out=xdt)
        return L, W, xdt

    @staticmethod
    @autocast_off
    def backward(ctx, dy, dh_last):
        X, dtc, A, Bm, Cm, lcum, L, W, xdt, y_in, entering = ctx.saved_tensors
        Bb, G, NC, c, Hg, P = X.shape
        N = Bm.shape[-1]
        dy = dy.view(Bb, NC, c, G, Hg, P).permute(0, 3, 1, 2, 4, 5)
        last = lcum[:, :, :, -1:]
        to_end = torch.exp(last - lcum)
        # Gradients of the states leaving each chunk, carried from the last chunk back.
        into_state = (dy * torch.exp(lcum)[..., None]).flatten(-2)
        dS, dh0 = _reverse_carry(torch.exp(last[:, :, :, 0]),
                                 (into_state.transpose(-1, -2) @ Cm).view(Bb, G, NC, Hg, P, N),
                                 dh_last.view(Bb, G, Hg, P, N))
        dSf = dS.flatten(3, 4)
        u = X * (dtc * to_end)[..., None]
        du = (Bm @ dSf.transpose(-1, -2)).view(Bb, G, NC, c, Hg, P)
        dy_h = dy.transpose(3, 4).contiguous()
        dW = dy_h @ xdt.transpose(-1, -2)
        dxdt = (du * to_end[..., None]).add_((W.transpose(-1, -2) @ dy_h).transpose(3, 4))  # token layout
        dCB = (dW * L).sum(3)
        dC = (into_state @ entering.flatten(3, 4)).add_(dCB @ Bm)
        dB = (u.flatten(-2) @ dSf).add_(dCB.transpose(-1, -2) @ Cm)
        # dlcum: +lcum_i and -lcum_j through W (its diagonal cancels exactly: left out), +lcum_i through y_in,
        # -lcum_j through the writes u and +last through them and through the entering state's decay. The last
        # token's write has exp(last - lcum_last) = 1: its two terms cancel exactly and are left out (in float32
        # they would swamp a small dA under strong decays).
        E = (dW * W).tril_(-1)
        through_u = (du * u).sum(-1)
        through_u[:, :, :, -1] = 0
        per_state = torch.linalg.vecdot(dS.flatten(-2), entering.flatten(-2))  # sum(dS * S) per head
        dlast = (torch.exp(last[:, :, :, 0]) * per_state).add_(through_u.sum(3))
        dlcum = (E.sum(-1) - E.sum(-2)).transpose(-1, -2) + (dy * y_in).sum(-1) - through_u
        # lcum is a cumulative sum: da is dlcum's reverse cumulative sum (summed from the end, not as a
        # difference of totals, which would cancel), plus dlast at every token.
        da = dlcum.flip(3).cumsum(3).flip(3).add_(dlast[:, :, :, None])
        ddt = (dxdt * X).sum(-1).add_(da * A.view(G, 1, 1, Hg))
        dA = (da * dtc).sum((0, 2, 3)).view(-1)
        dx = dxdt * dtc[..., None]
        return (_to_tokens(dx), _to_tokens(ddt), dA, _to_tokens(dB, heads=False), _to_tokens(dC, heads=False),
                dh0.reshape(Bb, G * Hg, P, N), None)


class _SSDFactored(torch.autograd.Function):
    """The chunked SSD form with the intra-chunk decays factored through each chunk's first row
    (docs/math/mamba2.md, "The factored form"): ``exp(lcum_i - lcum_j) = exp(lcum_i) exp(-lcum_j)``, so the
    decay-masked scores of all heads of a group are one ``tril(C B^T)`` times the inputs scaled per head
    by ``exp(-lcum)``, and the outputs are scaled back by ``exp(lcum)``: no per-head ``[c, c]`` matrices, every
    product one batched matmul per chunk and group. ``exp(-lcum)`` grows with the chunk's total decay, so the
    caller takes this only where that total stays within ``factored_limit``. The backward is written by hand
    and recomputes the exponentials, the scores and the scaled inputs instead of saving them.

    Inputs and outputs as :class:`_SSDChunks`.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, c):
        X, dtc, Bm, Cm, lcum = _chunk_views(x, dt, A, B, C, c)
        Bb, G, NC, _, Hg, P = X.shape
        N = Bm.shape[-1]
        last = lcum[:, :, :, -1:]
        v, u, M = _SSDFactored._recompute(X, dtc, Bm, Cm, lcum, last)
        entering, final = _carry(torch.exp(last[:, :, :, 0]),
                                 _bmm(u.flatten(-2).transpose(-1, -2), Bm).view(Bb, G, NC, Hg, P, N),
                                 h0.view(Bb, G, Hg, P, N))
        R = torch.baddbmm(_bmm(M, v.flatten(-2)).flatten(0, 2), Cm.reshape(-1, c, N),
                          entering.flatten(3, 4).transpose(-1, -2).reshape(-1, N, Hg * P))
        R = R.view(Bb, G, NC, c, Hg, P)
        ctx.save_for_backward(X, dtc, A, Bm, Cm, lcum, R, entering)
        y = _rows(R, torch.exp(lcum))
        return forward_outputs(_to_tokens(y), final.view(Bb, G * Hg, P, N))

    @staticmethod
    def _recompute(X, dtc, Bm, Cm, lcum, last):
        """v = dt' x exp(-lcum) (the inputs through the chunk's first row), u = dt' x exp(last - lcum) (each
        token's write to the chunk's final state), M = tril(C B^T) [Bb, G, NC, c, c]."""
        v = _rows(X, dtc * torch.exp(-lcum))
        u = _rows(X, dtc * torch.exp(last - lcum))
        return v, u, _bmm(Cm, Bm.transpose(-1, -2)).tril_()

    @staticmethod
    @autocast_off
    def backward(ctx, dy, dh_last):
        X, dtc, A, Bm, Cm, lcum, R, entering = ctx.saved_tensors
        Bb, G, NC, c, Hg, P = X.shape
        N = Bm.shape[-1]
        dy = dy.view(Bb, NC, c, G, Hg, P).permute(0, 3, 1, 2, 4, 5)
        last = lcum[:, :, :, -1:]
        v, u, M = _SSDFactored._recompute(X, dtc, Bm, Cm, lcum, last)
        dR = _rows(dy, torch.exp(lcum)).flatten(-2)  # [Bb, G, NC, c, Hg P]
        # Gradients of the states leaving each chunk, carried from the last chunk back.
        dS, dh0 = _reverse_carry(torch.exp(last[:, :, :, 0]),
                                 _bmm(dR.transpose(-1, -2), Cm).view(Bb, G, NC, Hg, P, N),
                                 dh_last.view(Bb, G, Hg, P, N))
        dSf = dS.flatten(3, 4)
        dM = _bmm(dR, v.flatten(-2).transpose(-1, -2)).tril_()  # summed over the group's heads by the matmul
        dv = _bmm(M.transpose(-1, -2), dR).view(Bb, G, NC, c, Hg, P)
        du = _bmm(Bm, dSf.transpose(-1, -2)).view(Bb, G, NC, c, Hg, P)
        dC = _bmm(dR, entering.flatten(3, 4)).add_(_bmm(dM, Bm))
        dB = _bmm(u.flatten(-2), dSf).add_(_bmm(dM.transpose(-1, -2), Cm))
        dxdt = torch.addcmul(_rows(dv, torch.exp(-lcum)).view(-1, P), du.reshape(-1, P),
                             torch.exp(last - lcum).reshape(-1, 1)).view(dv.shape)
        # dlcum: +lcum_i through exp(lcum) on the outputs (y = exp(lcum) R), -lcum_j through v, -lcum_j
        # through the writes u (whose +last goes to dlast, with the entering state's decay). A token's own
        # term (the diagonal of M) enters both the first and the second with exp(lcum_i - lcum_i) = 1 and
        # cancels exactly: it is taken out of both before the products, as is the last token's write, whose
        # exp(last - lcum_last) = 1 (in float32 such terms would swamp a small dA under strong decays, and
        # an exact zero gradient would come out as rounding noise).
        # The products below reuse tensors no longer needed (fresh large temporaries cost page faults here).
        Md = M.diagonal(0, -2, -1).reshape(-1, 1)  # C_i . B_i per token
        # (not by addcmul: its fused multiply-add would leave R_ii - M_ii v_i as a rounding error, not zero)
        R_off = torch.sub(R.reshape(-1, Hg * P), v.reshape(-1, Hg * P) * Md)
        dv_off = torch.sub(dv.reshape(-1, Hg * P), dR.reshape(-1, Hg * P) * Md)
        through_u = du.mul_(u).sum(-1)
        through_u[:, :, :, -1] = 0
        per_state = dS.flatten(-2).mul_(entering.flatten(-2)).sum(-1)  # sum(dS * S) per head
        dlast = (torch.exp(last[:, :, :, 0]) * per_state).add_(through_u.sum(3))
        dlcum = R_off.mul_(dR.reshape(-1, Hg * P)).view(R.shape).sum(-1)
        dlcum.sub_(dv_off.mul_(v.reshape(-1, Hg * P)).view(v.shape).sum(-1)).sub_(through_u)
        da = dlcum.flip(3).cumsum(3).flip(3).add_(dlast[:, :, :, None])
        dx = _rows(dxdt, dtc)
        ddt = dxdt.mul_(X).sum(-1).add_(da * A.view(G, 1, 1, Hg))
        dA = (da * dtc).sum((0, 2, 3)).view(-1)
        return (_to_tokens(dx), _to_tokens(ddt), dA, _to_tokens(dB, heads=False), _to_tokens(dC, heads=False),
                dh0.reshape(Bb, G * Hg, P, N), None)


def _chunk_views(x, dt, A, B, C, c):
    """[Bb, G, NC, c, Hg, *] views of the token layout (copies only where G > 1 makes them necessary) and the
    in-chunk cumulative log decays lcum [Bb, G, NC, c, Hg]."""
    Bb, T, H, P = x.shape
    G, N = B.shape[2:]
    NC, Hg = T // c, H // G
    X = x.view(Bb, NC, c, G, Hg, P).permute(0, 3, 1, 2, 4, 5)
    dtc = dt.view(Bb, NC, c, G, Hg).permute(0, 3, 1, 2, 4)
    Bm, Cm = (t.view(Bb, NC, c, G, N).permute(0, 3, 1, 2, 4) for t in (B, C))
    return X, dtc, Bm, Cm, (dtc * A.view(G, 1, 1, Hg)).cumsum(3)


def _bmm(a, b):
    """``a @ b`` over equal leading dims as one 3-d :func:`torch.bmm`."""
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.view(*a.shape[:-2], *out.shape[-2:])


def _rows(t, s):
    """``t * s[..., None]`` for t [..., P] and s [...], as a 2-d broadcast (the same broadcast on these 6-d
    views measured several times slower on the CPU). A new contiguous tensor of t's shape."""
    P = t.shape[-1]
    return (t.reshape(-1, P) * s.reshape(-1, 1)).view(t.shape)


def _to_tokens(t, heads=True):
    """[Bb, G, NC, c, *rest] -> the token layout [Bb, NC * c, G, *rest], with G and the heads of a group
    merged when ``heads`` (a view when G == 1)."""
    Bb, _, NC, c = t.shape[:4]
    t = t.movedim(1, 3)
    t = t.reshape(Bb, NC * c, *t.shape[3:])
    return t.flatten(2, 3) if heads else t


def _carry(decay, increments, first):
    """States entering every chunk, ``X_{n+1} = decay_n X_n + increments_n`` from ``X_0 = first``, and the
    state after the last: decay [Bb, G, NC, Hg], increments [Bb, G, NC, Hg, P, N], first [Bb, G, Hg, P, N]."""
    NC = increments.shape[2]
    entering = torch.empty_like(increments)
    entering[:, :, 0] = first
    for n in range(NC - 1):
        torch.addcmul(increments[:, :, n], entering[:, :, n], decay[:, :, n, :, None, None], out=entering[:, :, n + 1])
    return entering, torch.addcmul(increments[:, :, -1], entering[:, :, -1], decay[:, :, -1, :, None, None])


def _reverse_carry(decay, increments, last):
    """The carry backwards: gradients of the states leaving every chunk, ``D_{n-1} = decay_n D_n +
    increments_n`` from ``D_{NC-1} = last``, and of the first entering state (shapes as :func:`_carry`)."""
    NC = increments.shape[2]
    leaving = torch.empty_like(increments)
    leaving[:, :, -1] = last
    for n in range(NC - 1, 0, -1):
        torch.addcmul(increments[:, :, n], leaving[:, :, n], decay[:, :, n, :, None, None], out=leaving[:, :, n - 1])
    return leaving, torch.addcmul(increments[:, :, 0], leaving[:, :, 0], decay[:, :, 0, :, None, None])


def _chunked_dense(x, dt, A, B, C, h, chunk_size):
    """The chunked SSD form (docs/math/mamba2.md) of dense inputs, every chunk of every row at once:
    x [Bb, T, H, P], dt [Bb, T, H] (processed), B, C [Bb, T, G, N] (head h reads group h // (H / G)),
    h [Bb, H, P, N] entering. Only the state carry runs chunk by chunk. Returns (y without D [Bb, T, H, P],
    h_final)."""
    Bb, T, H, P = x.shape
    c = max(1, min(chunk_size, T))
    pad = (-T) % c
    if pad:  # dt = 0 on the padded tokens: no decay and no contribution; their outputs are cut off below
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    if x.shape[1] == 0:
        return x.new_zeros(Bb, 0, H, P), h
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    y, h = _chunks_function(dt, A, c).apply(x, dt, A, B, C, h.contiguous(), c)
    return y[:, :T], h


def _chunks_function(dt, A, c):
    """:class:`_SSDFactored` where every chunk's total log decay stays within :func:`factored_limit` (and
    outside torch.compile, where the check would synchronise); :class:`_SSDChunks`, whose decays never
    overflow, otherwise."""
    if not torch.compiler.is_compiling():
        totals = (dt.view(dt.shape[0], -1, c, dt.shape[2]).sum(2) * A).amin()
        if bool(totals >= -factored_limit(dt.dtype)):
            return _SSDFactored
    return _SSDChunks


@autocast_off
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
