"""The delta rule and the gated delta rule in plain PyTorch: step-by-step oracles and chunked WY forms.

All take the op's packed layout (q, k ``[B, T, H, K]``, v ``[B, T, H, V]``,
beta ``[B, T, H]``, for the gated rule g ``[B, T, H]``) with optional ``cu_seqlens`` (then B == 1), compute in
float32 (float64 when the inputs are float64) and return
``(o [B, T, H, V] in the input dtype, final_state [N, H, K, V] or None)``;
the state is float32 (float64 for float64 inputs).
All are differentiable by autograd; the chunked forms are the reference
backends of :mod:`seqmix.kernels.deltanet`.
"""

from __future__ import annotations

import torch

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


def _chunked_dense(q, k, v, beta, g, scale, S, chunk_size):
    """The WY/UT chunked form for dense [B, T, H, *] inputs already in the compute dtype.

    g: [B, T, H] log decays or None. S: [B, H, K, V] state entering the first chunk.
    Returns (o, S_final).
    """
    B, T, H = q.shape[:3]
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if pad:
        # Zero keys, values and betas leave the state unchanged, and zero log decays do not decay it;
        # the padded rows are cut off below.
        q, k, v, beta = (torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) for x in (q, k, v, beta))
        g = None if g is None else torch.nn.functional.pad(g, (0, 0, 0, pad))
    NT = (T + pad) // C
    if NT == 0:
        return q.new_zeros(B, 0, H, V), S
    # [B, H, NT, C, *]
    q, k, v = (x.reshape(B, NT, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v))
    beta = beta.reshape(B, NT, C, H).permute(0, 3, 1, 2)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    kb = k * beta[..., None]
    A = kb @ k.transpose(-1, -2)
    P = q @ k.transpose(-1, -2)
    kbg = kb
    if g is not None:
        # gcum: cumulative log decay inside each chunk. Ratios exp(gcum_i - gcum_j) are formed for i >= j only,
        # so no exponent is positive (exp(gcum_i) * exp(-gcum_j) would overflow for strong decays).
        gcum = g.reshape(B, NT, C, H).permute(0, 3, 1, 2).cumsum(-1)
        decay = torch.exp((gcum[..., :, None] - gcum[..., None, :]).masked_fill(~causal, float("-inf")))
        A, P = A * decay, P * decay
        kbg = kb * torch.exp(gcum)[..., None]
    A = A.masked_fill(~strict, 0)
    P = P.masked_fill(~causal, 0)
    M = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
    W = M @ kbg
    U = M @ (v * beta[..., None])
    q_in, k_out = q, k
    if g is not None:
        q_in = q * torch.exp(gcum)[..., None]
        k_out = k * torch.exp(gcum[..., -1:] - gcum)[..., None]
    # Only the state carry runs chunk by chunk; the outputs of all chunks are batched matmuls after it.
    # unbind, not indexing: its backward stacks the chunks' gradients once instead of one full-size
    # zero tensor per chunk.
    decays = [None] * NT if g is None else torch.exp(gcum[..., -1]).unbind(2)
    states, v_news = [], []
    for W_c, U_c, k_c, decay in zip(W.unbind(2), U.unbind(2), k_out.unbind(2), decays, strict=True):
        states.append(S)
        v_news.append(U_c - W_c @ S)
        S = S if decay is None else S * decay[..., None, None]
        S = S + k_c.transpose(-1, -2) @ v_news[-1]
    o = scale * (q_in @ torch.stack(states, 2) + P @ torch.stack(v_news, 2))
    o = o.permute(0, 2, 3, 1, 4).reshape(B, NT * C, H, V)[:, :T]
    return o, S


def _chunked(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = reference_dtype(q)
    in_dtype = q.dtype
    q, k, v, beta = (x.to(dt) for x in (q, k, v, beta))
    g = None if g is None else g.to(dt)
    if cu_seqlens is None:
        S0 = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
        o, finals = _chunked_dense(q, k, v, beta, g, scale, S0, chunk_size)
    else:
        outs, states = [], []
        for n, (_, s, e) in enumerate(sequence_spans(cu_seqlens, B, T)):
            S0 = q.new_zeros(1, H, K, V) if initial_state is None else initial_state[n : n + 1].to(dt)
            g_n = None if g is None else g[:, s:e]
            o_n, S = _chunked_dense(q[:, s:e], k[:, s:e], v[:, s:e], beta[:, s:e], g_n, scale, S0, chunk_size)
            outs.append(o_n)
            states.append(S)
        o = torch.cat(outs, 1)
        finals = torch.cat(states)
    return o.to(in_dtype), (finals if output_final_state else None)


def delta_rule_chunked(
    q, k, v, beta, scale, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64
):
    """The chunked WY/UT form (docs/math/deltanet.md): per chunk M = (I + A)^-1, W, U, V' = U - W S."""
    return _chunked(q, k, v, beta, None, scale, initial_state, output_final_state, cu_seqlens, chunk_size)


def gated_delta_rule_chunked(
    q, k, v, g, beta, scale, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64
):
    """The gated WY/UT form: with gcum the in-chunk cumulative log decay and G_ij = exp(gcum_i - gcum_j) (i >= j),
    A = tril_(diag(beta) (K K^T * G)), W = M diag(beta exp(gcum)) K, U = M diag(beta) V, V' = U - W S,
    O = scale (exp(gcum) Q S + (tril(Q K^T) * G) V'), S_next = exp(gcum_C) S + (K exp(gcum_C - gcum))^T V'."""
    return _chunked(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
