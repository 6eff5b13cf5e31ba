"""Gated linear attention in plain PyTorch: the step-by-step oracle and the chunked form (docs/math/gla.md).

Both take the op's packed layout (q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g ``[B, T, H, K]``)
with optional ``cu_seqlens`` (then B == 1), compute in float32 (float64 when the inputs are
float64) and return ``(o [B, T, H, V] in the input dtype, final_state [N, H, K, V] or None)``.
Both are differentiable (the chunked form by a hand-written backward where each chunk's total decay
allows its factored scores, by autograd otherwise); the chunked form is the reference backend of
:func:`seqmix.kernels.gla`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqmix.kernels.library import autocast_off, forward_outputs
from seqmix.kernels.sequences import over_sequences, reference_dtype, sequence_spans

SUB = 16  # rows of the sub-chunks of the secondary chunking


def gla_recurrent(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``, one token at a time."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = reference_dtype(q)

    def run(b, s, e, S):
        rows = []
        for t in range(s, e):
            S = S * torch.exp(g[b, t].to(dt))[:, :, None] + torch.einsum("hk,hv->hkv", k[b, t].to(dt), v[b, t].to(dt))
            rows.append(scale * torch.einsum("hkv,hk->hv", S, q[b, t].to(dt)))
        return (torch.stack(rows) if rows else q.new_zeros(0, H, V, dtype=dt)), S

    o, final = over_sequences(run, B, T, cu_seqlens, initial_state, q.new_zeros(H, K, V, dtype=dt), dt)
    return o.to(q.dtype), (final if output_final_state else None)


def _intra_chunk_scores(q, k, gcum):
    """A_ij = sum_c q_ic k_jc exp(gcum_ic - gcum_jc) for j <= i, by secondary chunking.

    q, k, gcum: [..., C, K] with C a multiple of SUB, split into n = C / SUB blocks of SUB rows. Block (r, s)
    below the diagonal (s < r) is a matmul of q exp(gcum - gcum_ref) and k exp(gcum_ref - gcum) with gcum_ref
    the first row of block r (both exponents <= 0); all of them in one batched matmul, the exponents of the
    blocks on and above the diagonal set to -inf first. Diagonal blocks are element-wise with masked
    exponents. Returns [..., C, C].
    """
    *lead, C, K = q.shape
    n = C // SUB
    q, k, gcum = (x.reshape(*lead, n, SUB, K) for x in (q, k, gcum))
    ref = gcum[..., :1, :]  # [..., n, 1, K]: each block row's reference
    q_ref = q * torch.exp(gcum - ref)
    below = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)  # (r, s): s < r
    expo = (ref[..., :, None, :, :] - gcum[..., None, :, :, :]).masked_fill(~below[:, :, None, None], float("-inf"))
    k_ref = k[..., None, :, :, :] * torch.exp(expo)  # [..., n (r), n (s), SUB, K]
    blocks = q_ref[..., :, None, :, :] @ k_ref.transpose(-1, -2)  # [..., n, n, SUB, SUB]
    causal = torch.ones(SUB, SUB, dtype=torch.bool, device=q.device).tril()
    expo = (gcum[..., :, None, :] - gcum[..., None, :, :]).masked_fill(~causal[:, :, None], float("-inf"))
    diagonal = (q[..., :, None, :] * k[..., None, :, :] * torch.exp(expo)).sum(-1)  # [..., n, SUB, SUB]
    eye = torch.eye(n, dtype=q.dtype, device=q.device)[:, :, None, None]
    blocks = blocks + diagonal[..., :, None, :, :] * eye
    return blocks.transpose(-3, -2).reshape(*lead, C, C)


def _to_chunks(x, NT, C):
    """[B, NT * C, H, D] -> [B, H, NT, C, D] (one copy)."""
    B, _, H, D = x.shape
    return x.view(B, NT, C, H, D).permute(0, 3, 1, 2, 4).contiguous()


def _from_chunks(x, T):
    """[B, H, NT, C, D] -> [B, T, H, D] (one copy: the layers' element-wise work after it runs on contiguous
    rows), the padding cut off."""
    B, H, NT, C, D = x.shape
    return x.permute(0, 2, 3, 1, 4).contiguous().view(B, NT * C, H, D)[:, :T]


def _carry(decay, increments, first):
    """``X_{n+1} = diag(decay_n) X_n + increments_n`` from ``X_0 = first``, one chunk at a time:
    decay [B, H, NT, K], increments [B, H, NT, K, V], first [B, H, K, V]; returns every X_n,
    [B, H, NT + 1, K, V]. The backward's reverse carry is the same with the chunks reversed."""
    B, H, NT, K, V = increments.shape
    out = increments.new_empty(B, H, NT + 1, K, V)
    out[:, :, 0] = first
    for n in range(NT):
        torch.addcmul(increments[:, :, n], out[:, :, n], decay[:, :, n, :, None], out=out[:, :, n + 1])
    return out


class _FactoredChunks(torch.autograd.Function):
    """The chunked form with each chunk's scores factored through the chunk's first row,
    ``A = tril((q exp(gcum)) (k exp(-gcum))^T)``: every product is a batched matmul. ``exp(-gcum)`` grows
    with the chunk's total decay, so the caller takes this only where that total stays below
    ``factored_limit``. The backward is written by hand (docs/math/gla.md, "The CPU reference") and
    recomputes the exponentials and scores instead of saving them.

    q, k, g [B, H, NT, C, K], v [B, H, NT, C, V], S0 [B, H, K, V], all in the compute dtype.
    Returns o [B, H, NT, C, V] and the final state [B, H, K, V].
    """

    @staticmethod
    def _factors(q, k, gcum, scale):
        eg = torch.exp(gcum)
        qg = q * eg * scale
        kg = k / eg
        return eg, qg, kg, (qg @ kg.transpose(-1, -2)).tril_()

    @staticmethod
    def forward(ctx, q, k, v, g, S0, scale):
        gcum = g.cumsum(-2)
        eg, qg, kg, A = _FactoredChunks._factors(q, k, gcum, scale)
        decay = eg[..., -1, :]
        states = _carry(decay, (kg * decay[..., None, :]).transpose(-1, -2) @ v, S0)
        o = (qg @ states[:, :, :-1]).add_(A @ v)
        ctx.save_for_backward(q, k, v, gcum, states)
        ctx.scale = scale
        return forward_outputs(o, states[:, :, -1].clone())

    @staticmethod
    @autocast_off
    def backward(ctx, do, dS_last):
        q, k, v, gcum, states = ctx.saved_tensors
        eg, qg, kg, A = _FactoredChunks._factors(q, k, gcum, ctx.scale)
        decay = eg[..., -1, :]
        # Gradients of the states leaving each chunk (dS[n] leaves chunk n), carried from the last chunk back.
        back = _carry(decay.flip(2), (qg.transpose(-1, -2) @ do).flip(2), dS_last).flip(2)
        dS, dS0 = back[:, :, 1:], back[:, :, 0]
        dA = (do @ v.transpose(-1, -2)).tril_()
        dv = (A.transpose(-1, -2) @ do).add_((kg * decay[..., None, :]) @ dS)
        dqg = (do @ states[:, :, :-1].transpose(-1, -2)).add_(dA @ kg)
        dkg = (dA.transpose(-1, -2) @ qg).add_((v @ dS.transpose(-1, -2)) * decay[..., None, :])
        # dgcum = q dq - k dk per row (through exp(gcum) and exp(-gcum)); dg is its reverse cumsum (summed from
        # the end, not as a difference of totals, which would cancel), plus on every row the path of the
        # chunk's total decay gcum_C into the state leaving the chunk, rowsum(dS * S_leaving).
        dgcum = qg * dqg - kg * dkg
        dg = dgcum.flip(-2).cumsum(-2).flip(-2).add_((dS * states[:, :, 1:]).sum(-1).unsqueeze(-2))
        return dqg * eg * ctx.scale, dkg / eg, dv, dg, dS0, None


def factored_limit(dtype) -> float:
    """The largest total log decay of a chunk for which the factored scores stay finite: exp(-gcum) at most
    the square root of the dtype's largest value (e^44 in float32), so that its products stay finite too."""
    return 0.5 * math.log(torch.finfo(dtype).max)


def _chunked_factored(q, k, v, g, scale, S, chunk_size):
    """The chunked form of dense [B, T, H, *] inputs through :class:`_FactoredChunks`; S [B, H, K, V]."""
    T = q.shape[1]
    C = chunk_size
    pad = (-T) % C
    if pad:
        # Zero keys and values leave the state unchanged and zero log decays do not decay it.
        q, k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    NT = (T + pad) // C
    o, S = _FactoredChunks.apply(*(_to_chunks(x, NT, C) for x in (q, k, v, g)), S, scale)
    return _from_chunks(o, T), S


def _chunked_dense(q, k, v, g, scale, S, chunk_size):
    """The chunked form for dense [B, T, H, *] inputs already in the compute dtype; S [B, H, K, V].

    Where every chunk's total decay stays within :func:`factored_limit` (and outside torch.compile, where
    the check would synchronise) the factored form serves; otherwise the scores by secondary chunking,
    differentiated by autograd, which no decay can overflow."""
    B, T, H = q.shape[:3]
    if B * T == 0:
        return q.new_zeros(B, T, H, v.shape[-1]), S
    if not torch.compiler.is_compiling():
        totals = F.pad(g, (0, 0, 0, 0, 0, (-T) % chunk_size)).unflatten(1, (-1, chunk_size)).sum(2)
        if bool(totals.min() >= -factored_limit(q.dtype)):
            return _chunked_factored(q, k, v, g, scale, S, chunk_size)
    return _chunked_subchunks(q, k, v, g, scale, S, chunk_size)


def _chunked_subchunks(q, k, v, g, scale, S, chunk_size):
    """The chunked form with the scores by secondary chunking (:func:`_intra_chunk_scores`), dense
    [B, T, H, *] inputs in the compute dtype; S [B, H, K, V]."""
    B, T, H = q.shape[:3]
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if pad:
        # Zero keys and values leave the state unchanged and zero log decays do not decay it.
        q, k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    NT = (T + pad) // C
    if NT == 0:
        return q.new_zeros(B, 0, H, V), S
    q, k, v, g = (x.reshape(B, NT, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v, g))
    gcum = g.cumsum(-2)
    A = _intra_chunk_scores(q, k, gcum)
    q_in = q * torch.exp(gcum)
    k_out = k * torch.exp(gcum[..., -1:, :] - gcum)
    # Only the state carry runs chunk by chunk (unbind, not indexing: one backward stack instead of a
    # full-size zero tensor per chunk); the outputs of all chunks are batched matmuls after it.
    states = []
    for decay, k_c, v_c in zip(torch.exp(gcum[:, :, :, -1]).unbind(2), k_out.unbind(2), v.unbind(2), strict=True):
        states.append(S)
        S = S * decay[..., None] + k_c.transpose(-1, -2) @ v_c
    o = scale * (q_in @ torch.stack(states, 2) + A @ v)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, NT * C, H, V)[:, :T]
    return o, S


@autocast_off
def gla_chunked(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64):
    """The chunked form: with gcum the in-chunk cumulative log decay (per channel),
    O = scale ((Q exp(gcum)) S + A V) with A_ij = sum_c q_ic k_jc exp(gcum_ic - gcum_jc) (j <= i), and
    S_next = diag(exp(gcum_C)) S + (K exp(gcum_C - gcum))^T V. ``chunk_size`` is a multiple of 16."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = reference_dtype(q)
    in_dtype = q.dtype
    q, k, v, g = (x.to(dt) for x in (q, k, v, g))
    if cu_seqlens is None:
        S0 = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
        o, finals = _chunked_dense(q, k, v, g, scale, S0, chunk_size)
    else:
        outs, states = [], []
        for n, (_, s, e) in enumerate(sequence_spans(cu_seqlens, B, T)):
            S0 = q.new_zeros(1, H, K, V) if initial_state is None else initial_state[n : n + 1].to(dt)
            o_n, S = _chunked_dense(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], scale, S0, chunk_size)
            outs.append(o_n)
            states.append(S)
        o = torch.cat(outs, 1)
        finals = torch.cat(states)
    return o.to(in_dtype), (finals if output_final_state else None)
