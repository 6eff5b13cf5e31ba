"""The glue every stateful fused op shares, written once.

A family's public op checks its arguments, picks a backend and, for the fused
backend, hands this module its per-token tensors, its parameters and its
kernels. This module owns the rest:

- packing a dense ``[B, T, ...]`` batch into the ``[L, ...]`` token-major
  layout of the kernels (B sequences of T tokens) and unpacking the output;
- the choice between the chunked kernels and the token-by-token kernel
  (:data:`RECURRENT_MAX_TOKENS`), which serves calls that want no gradient;
- the initial state in float32 (float64 for float64 inputs, which only the
  C++ CPU kernels take) and contiguous (the cast is differentiable, so autograd
  casts its gradient back to the state's dtype);
- the result of a call with no tokens (:func:`no_tokens_result`);
- autograd: a fused op is a pair of ``torch.library`` custom ops, forward and
  backward, with fake (shape-only) implementations, joined by
  :func:`register_autograd`. ``torch.compile(fullgraph=True)`` traces through
  them, and the backward's gradients come back in the inputs' dtypes. They are
  defined with seqmix/kernels/library.py's ``custom_op``, so eager calls skip
  torch.library's dispatch.

The protocol of a family's custom ops (docs/design.md, "The op layer"):

- ``<op>_chunk_fwd(*inputs, *options) -> (out, final_state, *saved)``: ``inputs``
  are tensors or None (per-token tensors, parameters, the float32 initial
  state, then the chunking's ``cu_seqlens``, ``chunk_index``, ``chunk_offsets``),
  ``options`` plain values, the last one ``output_final_state``. An absent
  final state is an empty tensor (custom ops return no None).
- ``<op>_chunk_bwd(*inputs, *saved, *options, dout, dfinal, needs) ->`` one
  gradient per input, in that input's dtype, an empty tensor where ``needs``
  (``ctx.needs_input_grad`` of the inputs) is False.
- ``<op>_recurrent_fwd(*inputs, *options) -> (out, final_state)``: the same
  arguments, the forward of calls that want no gradient; no backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from seqmix.kernels.sequences import Chunking, chunking_for, reference_dtype

# Below this many tokens per sequence on average (and with no gradient wanted) the token-by-token
# kernel beats the chunked forward's launches: decoding steps and short prefills.
RECURRENT_MAX_TOKENS = 64


@dataclass(frozen=True)
class FusedOp:
    """A family's fused kernels as custom ops (see the module docstring for their signatures).

    chunk_size:           tokens per chunk of the chunked kernels.
    chunk_fwd:            the chunked forward, with autograd registered.
    recurrent_fwd:        the token-by-token forward, or None.
    recurrent_max_tokens: tokens per sequence up to which ``recurrent_fwd`` serves a call that
                          wants no gradient; None: every such call.
    """

    chunk_size: int
    chunk_fwd: object
    recurrent_fwd: object = None
    recurrent_max_tokens: int | None = RECURRENT_MAX_TOKENS


def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def pack(t: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """[B, T, ...] -> [B * T, ...], contiguous: the token-major layout of the kernels."""
    return None if t is None else t.reshape(tokens, *t.shape[2:]).contiguous()


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def state_in(initial_state: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """The initial state as the kernels read it: float32 (float64 for float64 ``like``), contiguous."""
    return None if initial_state is None else initial_state.to(reference_dtype(like)).contiguous()


def nothing(like: torch.Tensor) -> torch.Tensor:
    """The empty tensor a custom op returns where there is no result."""
    return like.new_empty(0)


def or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return nothing(like) if t is None else t


def fake_outputs(like: torch.Tensor, out_shape, state_shape, store_final: bool):
    """Fake (out in ``like``'s dtype, float32 final state or an empty tensor) of a forward op."""
    final = like.new_empty(state_shape, dtype=torch.float32) if store_final else nothing(like)
    return like.new_empty(out_shape), final


def fake_key_value_outputs(q, v, cu_seqlens, store_final: bool):
    """Fake (o [L, H, V], final state [N, H, K, V]) of the linear-attention ops' forwards."""
    L, H, K = q.shape
    V = v.shape[-1]
    return fake_outputs(q, (L, H, V), (cu_seqlens.shape[0] - 1, H, K, V), store_final)


def chunking_args(chunking: Chunking) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return chunking.cu_seqlens, chunking.chunk_index, chunking.chunk_offsets


def chunking_of(cu_seqlens, chunk_index, chunk_offsets, chunk_size: int) -> Chunking:
    return Chunking(cu_seqlens=cu_seqlens, chunk_index=chunk_index, chunk_offsets=chunk_offsets,
                    chunk_size=chunk_size)


def no_tokens_result(out_shape, state_shape, initial_state, output_final_state: bool, like: torch.Tensor):
    """What an op with a state returns for no tokens (T = 0 or B = 0): an empty output in ``like``'s dtype and,
    when the final state is asked for, a copy of the initial state or zeros (float32; float64 for float64)."""
    out = like.new_empty(out_shape)
    if not output_final_state:
        return out, None
    if initial_state is not None:
        return out, initial_state.clone()
    return out, like.new_zeros(state_shape, dtype=reference_dtype(like))


def run_fused(
    op: FusedOp,
    per_token: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor | None],
    initial_state: torch.Tensor | None,
    options: Sequence,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
):
    """One call of a family's fused kernels on a dense or packed batch.

    ``per_token`` are [B, T, ...] tensors (the first one's shape gives B and T), ``params`` the
    rest; both may hold None for absent optional tensors. Returns (out [B, T, ...], final state or
    None).
    """
    batch, seqlen = per_token[0].shape[:2]
    tokens = batch * seqlen
    chunking = chunking_for(batch, seqlen, op.chunk_size, per_token[0].device, cu_seqlens)
    inputs = [pack(t, tokens) for t in per_token] + [contiguous(t) for t in params]
    inputs.append(state_in(initial_state, per_token[0]))
    limit = op.recurrent_max_tokens
    recurrent = op.recurrent_fwd is not None and not wants_grad(*per_token, *params, initial_state) and (
        limit is None or tokens <= limit * chunking.num_sequences)
    if recurrent:
        out, final = op.recurrent_fwd(*inputs, *chunking_args(chunking), *options, output_final_state)
    else:
        out, final, *_ = op.chunk_fwd(*inputs, *chunking_args(chunking), *options, output_final_state)
    return out.view(batch, seqlen, *out.shape[1:]), final if output_final_state else None


def grads_like(inputs: Sequence[torch.Tensor | None], needs: Sequence[bool], like: torch.Tensor):
    """Fake gradients: each needed input's shape and dtype, an empty tensor for the others."""
    return [torch.empty_like(t) if need and t is not None else nothing(like) for t, need in zip(inputs, needs)]


def as_input_grads(grads, inputs: Sequence[torch.Tensor | None], needs: Sequence[bool], like: torch.Tensor):
    """The backward's results as a custom op returns them: each needed gradient in its input's
    dtype, an empty tensor for the others."""
    return [g.to(t.dtype) if need and g is not None else nothing(like) for g, t, need in zip(grads, inputs, needs)]


def register_autograd(chunk_fwd, chunk_bwd, num_inputs: int, *, saved=None, per_input=None,
                      materialize_grads: bool = True) -> None:
    """Make ``chunk_bwd`` the gradient of ``chunk_fwd`` (the protocol in the module docstring) and
    give ``chunk_bwd`` its fake implementation; the first ``num_inputs`` arguments of the forward
    are its tensor inputs.

    Ops whose backward reads other tensors (a forward output, or not every input) pass
    ``saved(inputs, output)``, the tensors ``chunk_bwd`` takes before the options; ``chunk_bwd``'s
    fake is then theirs to register. ``per_input(grads)`` maps what ``chunk_bwd`` returns to one
    gradient per input, for inputs that share one gradient (a custom op returns no aliases).
    ``materialize_grads=False``: an output nobody uses gets None
    as its gradient, not a tensor of zeros the kernel would read.
    """
    if saved is None:
        chunk_bwd.register_fake(lambda *args: grads_like(args[:num_inputs], args[-1], args[0]))

        def saved(inputs, output):
            return (*inputs[:num_inputs], *output[2:])

    def setup_context(ctx, inputs, output):
        ctx.options = inputs[num_inputs:]
        ctx.save_for_backward(*saved(inputs, output))
        ctx.set_materialize_grads(materialize_grads)

    def backward(ctx, dout, dfinal, *_):
        needs = list(ctx.needs_input_grad[:num_inputs])
        if dfinal is not None and dfinal.numel() == 0:
            dfinal = None
        grads = chunk_bwd(*ctx.saved_tensors, *ctx.options, contiguous(dout), contiguous(dfinal), needs)
        if per_input is not None:
            grads = per_input(grads)
        return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * len(ctx.options)

    chunk_fwd.register_autograd(backward, setup_context=setup_context)
