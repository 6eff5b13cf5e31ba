"""The delta rule (DeltaNet) and the gated delta rule (Gated DeltaNet): public ops, argument checks,
backend dispatch and the kernels as torch.library ops (seqmix/kernels/op.py runs them). Both share
one set of Triton kernels (a constexpr flag adds the decay) and one pair of C++ CPU kernels for training
(cpu.py, delta_rule_cpu.cpp). The math: docs/math/deltanet.md."""

from __future__ import annotations

import torch
from torch import Tensor

from seqmix.kernels import triton_limits
from seqmix.kernels.backend import LazyModule, select_backend
from seqmix.kernels.checks import (
    check_key_value_state,
    check_log_decay,
    check_query_key_value,
    check_same_dtype,
    check_scale,
    check_tensor,
)
from seqmix.kernels.deltanet import cpu as cpu_kernels
from seqmix.kernels.deltanet.reference import (
    delta_rule_chunked,
    delta_rule_recurrent,
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
)
from seqmix.kernels.library import custom_op
from seqmix.kernels.op import (
    FusedOp,
    as_input_grads,
    chunking_of,
    fake_key_value_outputs,
    no_tokens_result,
    nothing,
    or_empty,
    register_autograd,
    run_fused,
)
from seqmix.kernels.triton_limits import DELTA_RULE_CHUNK

__all__ = [
    "delta_rule", "delta_rule_chunked", "delta_rule_recurrent",
    "gated_delta_rule", "gated_delta_rule_chunked", "gated_delta_rule_recurrent",
]

kernels = LazyModule("seqmix.kernels.deltanet.triton")


def _check_inputs(q, k, v, beta, initial_state, cu_seqlens, g=None):
    check_query_key_value(q, k, v)
    check_tensor("beta", beta, q.shape[:3], dims="[B, T, H]", like=q)
    check_same_dtype(("q", "k", "v", "beta"), (q, k, v, beta))
    if g is not None:
        check_log_decay("g", g, q.shape[:3], dims="[B, T, H]", like=q)
    return check_key_value_state(q, v, initial_state, cu_seqlens)


# The kernels as torch.library ops (the protocol of seqmix/kernels/op.py): q, k [L, H, K], v [L, H, V],
# beta and g [L, H] packed; h0 [N, H, K, V] float32; g None is the plain delta rule.

@custom_op("seqmix::delta_rule_chunk_fwd", mutates_args=())
def _chunk_fwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, h0: Tensor | None,
               cu_seqlens: Tensor, chunk_index: Tensor, chunk_offsets: Tensor, scale: float, store_final: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (o, final state, and for the backward: each chunk's M = (I + A)^-1 as m_wy [L, H, 64] and
    the in-chunk cumulative g [L, H], both float32)."""
    chunking = chunking_of(cu_seqlens, chunk_index, chunk_offsets, DELTA_RULE_CHUNK)
    gcum = None if g is None else kernels.chunk_local_cumsum(g, chunking)
    o, ht, m_wy = kernels.chunk_delta_rule_fwd(q, k, v, beta, gcum, scale, h0, chunking, store_final)
    return o, or_empty(ht, q), m_wy, or_empty(gcum, q)


@_chunk_fwd.register_fake
def _(q, k, v, beta, g, h0, cu_seqlens, chunk_index, chunk_offsets, scale, store_final):
    L, H, _ = q.shape
    o, ht = fake_key_value_outputs(q, v, cu_seqlens, store_final)
    f32 = {"dtype": torch.float32}
    return o, ht, q.new_empty((L, H, DELTA_RULE_CHUNK), **f32), nothing(q) if g is None else q.new_empty((L, H), **f32)


@custom_op("seqmix::delta_rule_chunk_bwd", mutates_args=())
def _chunk_bwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, h0: Tensor | None,
               cu_seqlens: Tensor, chunk_index: Tensor, chunk_offsets: Tensor, m_wy: Tensor, gcum: Tensor,
               scale: float, store_final: bool, do: Tensor, dht: Tensor | None, needs: list[bool]
               ) -> list[Tensor]:
    chunking = chunking_of(cu_seqlens, chunk_index, chunk_offsets, DELTA_RULE_CHUNK)
    dq, dk, dv, dbeta, dg, dh0 = kernels.chunk_delta_rule_bwd(
        q, k, v, beta, None if g is None else gcum, m_wy, scale, h0, chunking, do, dht, h0 is not None and needs[5]
    )
    inputs = (q, k, v, beta, g, h0, cu_seqlens, chunk_index, chunk_offsets)
    return as_input_grads((dq, dk, dv, dbeta, dg, dh0, None, None, None), inputs, needs, q)


register_autograd(_chunk_fwd, _chunk_bwd, num_inputs=9)


@custom_op("seqmix::delta_rule_recurrent_fwd", mutates_args=())
def _recurrent_fwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, h0: Tensor | None,
                   cu_seqlens: Tensor, chunk_index: Tensor, chunk_offsets: Tensor, scale: float, store_final: bool
                   ) -> tuple[Tensor, Tensor]:
    o, ht = kernels.recurrent_delta_rule_fwd(q, k, v, beta, g, scale, h0, cu_seqlens, store_final)
    return o, or_empty(ht, q)


@_recurrent_fwd.register_fake
def _(q, k, v, beta, g, h0, cu_seqlens, chunk_index, chunk_offsets, scale, store_final):
    return fake_key_value_outputs(q, v, cu_seqlens, store_final)


FUSED = FusedOp(DELTA_RULE_CHUNK, _chunk_fwd, _recurrent_fwd)


def _dispatch(op, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, backend):
    n = _check_inputs(q, k, v, beta, initial_state, cu_seqlens, g)
    T, K, V = q.shape[1], q.shape[3], v.shape[-1]
    scale = check_scale(scale, K**-0.5)
    # The C++ kernels only once compiled (build_cpu=False): the chunked reference is fast enough that a short
    # run should not wait for the compile; backend="cpu" builds them.
    name = select_backend(op, backend, q.device, ("cpu", "triton", "reference"),
                          {"triton": triton_limits.unsupported("q, k, v, beta", q.dtype, K=K, V=V),
                           "cpu": cpu_kernels.unsupported(q.dtype, V)},
                          build_cpu=False)
    B, _, H, _ = q.shape
    if B * T == 0:
        return no_tokens_result((B, T, H, V), (n, H, K, V), initial_state, output_final_state, q)
    if name == "cpu":  # the kernel computes in q's dtype: the log decays are cast to it
        g = None if g is None else g.to(q.dtype)
        return run_fused(cpu_kernels.FUSED, (q, k, v, beta, g), (), initial_state, (scale,), output_final_state,
                         cu_seqlens)
    if name == "triton":
        return run_fused(FUSED, (q, k, v, beta, g), (), initial_state, (scale,), output_final_state, cu_seqlens)
    if g is None:
        return delta_rule_chunked(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens)
    return gated_delta_rule_chunked(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The delta rule: ``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``, ``o_t = scale S_t^T q_t``.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys (not normalised here; DeltaNet L2-normalises them).
        v: [B, T, H, V] values.
        beta: [B, T, H] write strengths, usually in (0, 1).
        scale: multiplies the queries; defaults to ``K ** -0.5``.
        initial_state: [N, H, K, V] state before the first token of each sequence
            (N = B, or the number of packed sequences); float32 by convention.
        output_final_state: also return the state after the last token.
        cu_seqlens: [N+1] int32/int64 boundaries of sequences packed as
            ``[1, sum(T_i), ...]``; states reset at every boundary.
        backend: None (automatic: Triton on CUDA tensors; on CPU tensors the C++ kernels once
            compiled (``python -m seqmix.kernels.build``), else Triton under its interpreter, else the
            reference), ``"reference"``, ``"triton"`` or ``"cpu"`` (float32 and float64, builds the
            C++ kernels; their final state and gradients in the inputs' dtype).

    Returns:
        o: [B, T, H, V] in the inputs' dtype.
        final_state: [N, H, K, V] float32 (float64 for float64 inputs), or None.
    """
    return _dispatch("delta_rule", q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens,
                     backend)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule (Gated DeltaNet):
    ``S_t = e^{g_t} S_{t-1} + beta_t k_t (v_t - e^{g_t} S_{t-1}^T k_t)^T``, ``o_t = scale S_t^T q_t``.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys (not normalised here; GatedDeltaNet L2-normalises them).
        v: [B, T, H, V] values.
        g: [B, T, H] log decays, <= 0 (any floating dtype; used in float32). Values as small as
            -20 per token are fine: decay ratios are formed in log space inside each chunk.
        beta: [B, T, H] write strengths, usually in (0, 1).
        scale: multiplies the queries; defaults to ``K ** -0.5``.
        initial_state: [N, H, K, V] state before the first token of each sequence
            (N = B, or the number of packed sequences); float32 by convention.
        output_final_state: also return the state after the last token.
        cu_seqlens: [N+1] int32/int64 boundaries of sequences packed as
            ``[1, sum(T_i), ...]``; states reset at every boundary.
        backend: None (automatic: Triton on CUDA tensors; on CPU tensors the C++ kernels once
            compiled (``python -m seqmix.kernels.build``), else Triton under its interpreter, else the
            reference), ``"reference"``, ``"triton"`` or ``"cpu"`` (float32 and float64, builds the
            C++ kernels; their final state and gradients in the inputs' dtype).

    Returns:
        o: [B, T, H, V] in the inputs' dtype.
        final_state: [N, H, K, V] float32 (float64 for float64 inputs), or None.
    """
    if g is None:
        raise ValueError("g must be a tensor of log decays of shape [B, T, H], got None")
    return _dispatch("gated_delta_rule", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                     backend)
