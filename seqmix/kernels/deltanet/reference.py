"""The delta rule and the gated delta rule in plain PyTorch: step-by-step oracles and chunked WY forms.

All take the op's packed layout (q, k ``[B, T, H, K]``, v ``[B, T, H, V]``,
beta ``[B, T, H]``, for the gated rule g ``[B, T, H]``) with optional ``cu_seqlens`` (then B == 1), compute in
float32 (float64 when the inputs are float64) and return
``(o [B, T, H, V] in the input dtype, final_state [N, H, K, V] or None)``;
the state is float32 (float64 for float64 inputs).
All are differentiable; the recurrences by autograd (they are the oracles), the chunked forms, the
reference backends of :mod:`seqmix.kernels.deltanet`, through an autograd function with a hand-written
backward (docs/math/deltanet.md, "The chunked reference on the CPU"; once differentiable). Their chunks
are 32 tokens: the fastest on the CPU at the layers' head dims (docs/design.md, "CPU references").
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from seqmix.kernels.library import autocast_off, forward_outputs
from seqmix.kernels.sequences import over_sequences, reference_dtype, sequence_spans


def _recurrent(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens):
    """One token at a time; the state decays by exp(g_t) before each update when g is given."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = reference_dtype(q)

    def run(b, s, e, S):
        rows = []
        for t in range(s, e):
            qt, kt, vt = q[b, t].to(dt), k[b, t].to(dt), v[b, t].to(dt)
            bt = beta[b, t].to(dt)
            if g is not None:
                S = S * torch.exp(g[b, t].to(dt))[:, None, None]
            v_new = vt - torch.einsum("hkv,hk->hv", S, kt)
            S = S + torch.einsum("hk,hv->hkv", kt * bt[:, None], v_new)
            rows.append(scale * torch.einsum("hkv,hk->hv", S, qt))
        return (torch.stack(rows) if rows else q.new_zeros(0, H, V, dtype=dt)), S

    o, final = over_sequences(run, B, T, cu_seqlens, initial_state, q.new_zeros(H, K, V, dtype=dt), dt)
    return o.to(q.dtype), (final if output_final_state else None)


def delta_rule_recurrent(q, k, v, beta, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``, ``o_t = scale S_t^T q_t``, one token at a time."""
    return _recurrent(q, k, v, beta, None, scale, initial_state, output_final_state, cu_seqlens)


def gated_delta_rule_recurrent(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                               cu_seqlens=None):
    """``S_t = e^{g_t} S_{t-1} + beta_t k_t (v_t - e^{g_t} S_{t-1}^T k_t)^T``, ``o_t = scale S_t^T q_t``,
    one token at a time."""
    return _recurrent(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens)


def _into_chunks(x, NT, C):
    """[B, T, H, *] -> [B*H, NT, C, *] contiguous, zero past T: one copy."""
    B, T, H = x.shape[:3]
    tail = x.shape[3:]
    out = (x.new_empty if NT * C == T else x.new_zeros)(B, H, NT * C, *tail)
    out[:, :, :T] = x.transpose(1, 2)
    return out.view(B * H, NT, C, *tail)


def _from_chunks(x, B, T):
    """[B*H, NT, C, *] -> [B, T, H, *] contiguous, the padding cut off: one copy."""
    BH, NT, C = x.shape[:3]
    return x.reshape(B, BH // B, NT * C, *x.shape[3:])[:, :, :T].transpose(1, 2).contiguous()


def _solve_unit_lower(A, R, transpose=False):
    """(I + A)^-1 R, or (I + A)^-T R with ``transpose``, for strictly lower A [..., C, C] and contiguous R
    [..., C, N]; contiguous result. Posed as the right-hand solve of R^T: LAPACK works on column-major
    matrices, and the column-major R^T and result are R's and the result's row-major memory, so nothing is
    copied (solving (I + A) X = R directly copies R and returns a column-major X: 3x slower on the CPU)."""
    At = A if transpose else A.transpose(-1, -2)
    return torch.linalg.solve_triangular(At, R.transpose(-1, -2), upper=not transpose, left=False,
                                         unitriangular=True).transpose(-1, -2)


def _rowsum(a, b):
    """sum over the last dim of a * b for short rows (the head dims), as a batch of 1 x n by n x 1 products: no
    temporary of a's size (a product and a sum: 1.6x slower on the CPU at n = 32; at n = 1024 the batched
    products are 4x slower than them)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).flatten(-3)


class _ChunkedDeltaRule(torch.autograd.Function):
    """The chunked WY/UT form of the (gated) delta rule with a hand-written backward
    (docs/math/deltanet.md, "The chunked reference on the CPU").

    q, k [B, T, H, K], v [B, T, H, V], beta and g (None: the plain delta rule) [B, T, H], all dense in the
    compute dtype; S0 [B, H, K, V] or None (zeros). Returns (o [B, T, H, V], the final state [B, H, K, V]).
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, g, S0, scale, C):
        B, T, H, K = q.shape
        V = v.shape[-1]
        NT = -(-T // C)
        # [B*H, NT, C, *]; zero keys, values and betas past T leave the state unchanged, and zero log
        # decays do not decay it.
        q, k, v, beta = (_into_chunks(x, NT, C) for x in (q, k, v, beta))
        kb = k * beta[..., None]
        kT = k.transpose(-1, -2)
        A, P = kb @ kT, q @ kT  # [B*H, NT, C, C]
        if g is None:
            eg = ek = G = None
            A.tril_(-1)
            P.tril_()
            X, q_in, k_out = kb, q, k
        else:
            # gc: the in-chunk cumulative log decay; G_ij = exp(gc_i - gc_j) for i >= j, else 0. tril selects
            # (it does not multiply), so the overflowing exponents above the diagonal cannot become NaN.
            gc = _into_chunks(g, NT, C).cumsum_(-1)
            G = (gc[..., :, None] - gc[..., None, :]).exp_().tril_()
            A.mul_(G).diagonal(dim1=-2, dim2=-1).zero_()  # G is lower triangular: only the diagonal is left
            P.mul_(G)
            eg, ek = gc.exp(), (gc[..., -1:] - gc).exp_()  # e^gc, and the decay from each token to the end
            X = kb * eg[..., None]
            q_in, k_out = q * eg[..., None], k * ek[..., None]
        # [W | U] = (I + A)^-1 [X | diag(beta) V] in one solve; the unit diagonal is implied (A's is 0).
        WU = _solve_unit_lower(A, torch.cat([X, v * beta[..., None]], -1))
        W, U = WU[..., :K], WU[..., K:]
        # The carry as one affine map per chunk, S_next = Tr S + Bn with Tr = gamma I - K~^T W and
        # Bn = K~^T U (K~ = k_out), so that the loop is one call per chunk; V' = U - W S after it.
        KWU = k_out.transpose(-1, -2) @ WU  # [B*H, NT, K, K + V]
        Tr, Bn = KWU[..., :K].neg_(), KWU[..., K:]
        Tr.diagonal(dim1=-2, dim2=-1).add_(1 if g is None else eg[..., -1:])
        S = q.new_zeros(B * H, K, V) if S0 is None else S0.reshape(B * H, K, V)
        states = []
        for n in range(NT):
            states.append(S)
            S = torch.baddbmm(Bn[:, n], Tr[:, n], S)
        states = torch.stack(states, 1)  # [B*H, NT, K, V]
        v_new = torch.baddbmm(U.flatten(0, 1), W.flatten(0, 1), states.flatten(0, 1), alpha=-1)
        o = torch.baddbmm((q_in @ states).flatten(0, 1), P.flatten(0, 1), v_new, beta=scale, alpha=scale)
        v_new = v_new.view(B * H, NT, C, V)
        ctx.save_for_backward(q, k, v, beta, eg, ek, G, A, P, WU, states, v_new, q_in, k_out, kb, Tr)
        ctx.scale, ctx.shape, ctx.has_s0 = scale, (B, T, H, K, V), S0 is not None
        return forward_outputs(_from_chunks(o.view(B * H, NT, C, V), B, T), S.view(B, H, K, V))

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, do, dS):
        q, k, v, beta, eg, ek, G, A, P, WU, states, v_new, q_in, k_out, kb, Tr = ctx.saved_tensors
        scale = ctx.scale
        B, T, H, K, V = ctx.shape
        BH, NT, C = q.shape[:3]
        do = _into_chunks(do, NT, C)
        W = WU[..., :K]
        # The state carry in reverse, dS_n = Tr_n^T dS_{n+1} + scale (Q~ - P W)^T dO_n (Q~ = q_in): the
        # second term reaches S_n through the outputs, directly and through V'.
        QW = torch.baddbmm(q_in.flatten(0, 1), P.flatten(0, 1), W.flatten(0, 1), alpha=-1)
        ds_local = (QW.transpose(-1, -2) @ do.flatten(0, 1)).mul_(scale).view(BH, NT, K, V)
        dS = dS.reshape(BH, K, V)
        d_next = [None] * NT  # the gradients of the states leaving each chunk
        for n in reversed(range(NT)):
            d_next[n] = dS
            dS = torch.baddbmm(ds_local[:, n], Tr[:, n].transpose(-1, -2), dS)
        d_next = torch.stack(d_next, 1)
        # dV' = scale P^T dO + K~ dS_next
        dv_new = torch.baddbmm((P.transpose(-1, -2) @ do).flatten(0, 1), k_out.flatten(0, 1), d_next.flatten(0, 1),
                               beta=scale).view(BH, NT, C, V)
        states_t = states.transpose(-1, -2)
        dq_in = do @ states_t  # times scale below
        dk_out = v_new @ d_next.transpose(-1, -2)
        # V' = U - W S, [W | U] = (I + A)^-1 [X | Y]: [dX | dY] = (I + A)^-T [-dV' S^T | dV'] and
        # dA = -tril_(dX W^T + dY U^T).
        dXY = _solve_unit_lower(A, torch.cat([(dv_new @ states_t).neg_(), dv_new], -1), transpose=True)
        dA = (dXY @ WU.transpose(-1, -2)).neg_()  # tril_(-1) below (with G: its diagonal cleared)
        dX, dY = dXY[..., :K], dXY[..., K:]
        dP = (do @ v_new.transpose(-1, -2)).mul_(scale)
        # A = tril_(diag(beta) (K K^T * G)), P = tril(Q K^T * G), X = diag(beta e^gc) K, Y = diag(beta) V.
        # The products accumulate into their sums in place (baddbmm_): no separate pass per term.
        if eg is None:
            dA.tril_(-1)
            dP.tril_()
            TA, TP = dA, dP
            Z = torch.baddbmm(dX.flatten(0, 1), dA.flatten(0, 1), k.flatten(0, 1))
            dq = torch.baddbmm(dq_in.flatten(0, 1), TP.flatten(0, 1), k.flatten(0, 1), beta=scale)
            dk = torch.addcmul(dk_out, Z.view_as(k), beta[..., None])
        else:
            # E = dA * A + dP * P before dA and dP are scaled by G in place: each exponent gc_i - gc_j of A
            # and P moves with gc_i and against gc_j.
            E = (dA * A).addcmul_(dP, P)
            TA, TP = dA.mul_(G), dP.mul_(G)  # G is lower triangular: only TA's diagonal is left to clear
            TA.diagonal(dim1=-2, dim2=-1).zero_()
            Z = (dX * eg[..., None]).flatten(0, 1).baddbmm_(TA.flatten(0, 1), k.flatten(0, 1))
            dq_in.mul_((eg * scale)[..., None])  # the gradient of q through Q~ = Q e^gc
            dq_q = _rowsum(dq_in, q)
            dq = dq_in.flatten(0, 1).baddbmm_(TP.flatten(0, 1), k.flatten(0, 1))
            dk_out.mul_(ek[..., None])  # now the gradient of k through K~ = diag(ek) K
            dk = torch.addcmul(dk_out, Z.view_as(k), beta[..., None])
        Z = Z.view_as(k)
        dk.flatten(0, 1).baddbmm_(TA.transpose(-1, -2).flatten(0, 1), kb.flatten(0, 1)).baddbmm_(
            TP.transpose(-1, -2).flatten(0, 1), q.flatten(0, 1))
        dq = dq.view_as(q)
        dv = dY * beta[..., None]
        dbeta = _rowsum(k, Z) + _rowsum(dY, v)
        dg = None
        if eg is not None:
            dgc = E.sum(-1) - E.sum(-2) + dq_q + _rowsum(dX, k) * beta * eg
            e = _rowsum(dk_out, k)  # dk_out is already scaled by ek: the sum of dK~ * K~
            dgc = dgc - e
            dgc[..., -1] += e.sum(-1) + (states * d_next).sum((-1, -2)) * eg[..., -1]
            dg = _from_chunks(dgc.flip(-1).cumsum(-1).flip(-1), B, T)
        grads = [_from_chunks(x, B, T) for x in (dq, dk, dv, dbeta)]
        return (*grads, dg, dS.view(B, H, K, V) if ctx.has_s0 else None, None, None)


def _chunked_dense(q, k, v, beta, g, scale, S0, chunk_size):
    """Dense [B, T, H, *] inputs in the compute dtype, S0 [B, H, K, V] or None (zeros). Returns (o, S_final)."""
    if q.shape[1] == 0:
        B, _, H, K = q.shape
        S = q.new_zeros(B, H, K, v.shape[-1]) if S0 is None else S0
        return q.new_zeros(B, 0, H, v.shape[-1]), S
    return _ChunkedDeltaRule.apply(q, k, v, beta, g, S0, scale, chunk_size)


@autocast_off
def _chunked(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    B, T = q.shape[:2]
    dt = reference_dtype(q)
    in_dtype = q.dtype
    q, k, v, beta = (x.to(dt) for x in (q, k, v, beta))
    g = None if g is None else g.to(dt)
    if cu_seqlens is None:
        S0 = None if initial_state is None else initial_state.to(dt)
        o, finals = _chunked_dense(q, k, v, beta, g, scale, S0, chunk_size)
    else:
        outs, states = [], []
        for n, (_, s, e) in enumerate(sequence_spans(cu_seqlens, B, T)):
            S0 = None if initial_state is None else initial_state[n : n + 1].to(dt)
            g_n = None if g is None else g[:, s:e]
            o_n, S = _chunked_dense(q[:, s:e], k[:, s:e], v[:, s:e], beta[:, s:e], g_n, scale, S0, chunk_size)
            outs.append(o_n)
            states.append(S)
        o = torch.cat(outs, 1)
        finals = torch.cat(states)
    return o.to(in_dtype), (finals if output_final_state else None)


def delta_rule_chunked(
    q, k, v, beta, scale, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=32
):
    """The chunked WY/UT form (docs/math/deltanet.md): per chunk M = (I + A)^-1, W, U, V' = U - W S."""
    return _chunked(q, k, v, beta, None, scale, initial_state, output_final_state, cu_seqlens, chunk_size)


def gated_delta_rule_chunked(
    q, k, v, g, beta, scale, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=32
):
    """The gated WY/UT form: with gcum the in-chunk cumulative log decay and G_ij = exp(gcum_i - gcum_j) (i >= j),
    A = tril_(diag(beta) (K K^T * G)), W = M diag(beta exp(gcum)) K, U = M diag(beta) V, V' = U - W S,
    O = scale (exp(gcum) Q S + (tril(Q K^T) * G) V'), S_next = exp(gcum_C) S + (K exp(gcum_C - gcum))^T V'."""
    return _chunked(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
