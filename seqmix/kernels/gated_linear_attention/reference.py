"""Gated linear attention in plain PyTorch: the step-by-step oracle and the chunked form (docs/math/gla.md).

Both take the op's packed layout (q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g ``[B, T, H, K]``)
with optional ``cu_seqlens`` (then B == 1), compute in float32 (float64 when the inputs are
float64) and return ``(o [B, T, H, V] in the input dtype, final_state [N, H, K, V] or None)``.
Both are differentiable by autograd; the chunked form is the reference backend of
:func:`seqmix.kernels.gla`.
"""

from __future__ import annotations

import torch

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

    q, k, gcum: [..., C, K] with C a multiple of SUB. Blocks of SUB rows below the diagonal are
    matmuls of q exp(gcum - gcum_ref) and k exp(gcum_ref - gcum) with gcum_ref the block row's first row (both
    exponents <= 0); diagonal blocks are taken element-wise with masked exponents. Returns [..., C, C].
    """
    C = q.shape[-2]
    n = C // SUB
    blocks = [[None] * n for _ in range(n)]
    causal = torch.ones(SUB, SUB, dtype=torch.bool, device=q.device).tril()
    for r in range(n):
        rows = slice(r * SUB, (r + 1) * SUB)
        q_r, k_r, gcum_r = q[..., rows, :], k[..., rows, :], gcum[..., rows, :]
        ref = gcum_r[..., :1, :]
        q_ref = q_r * torch.exp(gcum_r - ref)
        for s in range(r):
            cols = slice(s * SUB, (s + 1) * SUB)
            blocks[r][s] = q_ref @ (k[..., cols, :] * torch.exp(ref - gcum[..., cols, :])).transpose(-1, -2)
        expo = (gcum_r[..., :, None, :] - gcum_r[..., None, :, :]).masked_fill(~causal[:, :, None], float("-inf"))
        blocks[r][r] = (q_r[..., :, None, :] * k_r[..., None, :, :] * torch.exp(expo)).sum(-1)
        for s in range(r + 1, n):
            blocks[r][s] = torch.zeros_like(blocks[r][r])
    return torch.cat([torch.cat(row, -1) for row in blocks], -2)


def _chunked_dense(q, k, v, g, scale, S, chunk_size):
    """The chunked form for dense [B, T, H, *] inputs already in the compute dtype; S [B, H, K, V]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if pad:
        # Zero keys and values leave the state unchanged and zero log decays do not decay it.
        q, k, v, g = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    NT = (T + pad) // C
    if NT == 0:
        return q.new_zeros(B, 0, H, V), S
    q, k, v, g = (x.reshape(B, NT, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v, g))
    gcum = g.cumsum(-2)
    A = _intra_chunk_scores(q, k, gcum)
    q_in = q * torch.exp(gcum)
    k_out = k * torch.exp(gcum[..., -1:, :] - gcum)
    outs = []
    for c in range(NT):
        outs.append(scale * (q_in[:, :, c] @ S + A[:, :, c] @ v[:, :, c]))
        S = S * torch.exp(gcum[:, :, c, -1])[..., None] + k_out[:, :, c].transpose(-1, -2) @ v[:, :, c]
    o = torch.stack(outs, 2).permute(0, 2, 3, 1, 4).reshape(B, NT * C, H, V)[:, :T]
    return o, S


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
