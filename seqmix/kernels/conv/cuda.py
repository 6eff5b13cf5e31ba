"""The conv family's CUDA kernels (``seqmix._C``, built from ``csrc/`` by setup.py) as
``torch.library`` ops, so ``torch.compile`` traces through them: each op has a fake
(shape-only) implementation, and the forward ops carry their backward with
``register_autograd``. The CUDA stream travels to the binding as an integer.

The ops are defined whether or not the extension was built; the public ops only call them
when ``select_backend`` picked "cuda", which needs the extension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqmix.kernels.backend import BackendUnavailable, cuda_extension
from seqmix.kernels.library import custom_op

# dynamic_conv's kernels keep a chunk's weights and gradients in shared memory, which bounds K
# (csrc/conv_kernels.h: kMaxTaps).
MAX_TAPS = 64


def dynamic_conv_unsupported(dtype: torch.dtype, taps: int) -> str | None:
    """Why the CUDA dynamic_conv kernels cannot take this call; None if they can."""
    if taps > MAX_TAPS:
        return f"the CUDA kernels take K <= {MAX_TAPS}, got K={taps}"
    return unsupported(dtype)


def _ext():
    ext = cuda_extension()
    if ext is None:
        raise BackendUnavailable("the CUDA extension seqmix._C was not built (see setup.py)")
    return ext


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def unsupported(dtype: torch.dtype) -> str | None:
    """Why the CUDA kernels cannot take activations of ``dtype``; None if they can."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"x must be float16, bfloat16 or float32, got {dtype}"
    return None


# -- causal_conv1d ---------------------------------------------------------------------------

@custom_op("seqmix::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor,
                      silu: bool, store_final: bool) -> tuple[Tensor, Tensor]:
    """x [L, D] packed, weight [D, W], h0 [N, D, W-1] float32. Returns (out, final state or an empty tensor)."""
    return tuple(_ext().causal_conv1d_fwd(x, weight, bias, h0, cu_seqlens, silu, store_final, _stream(x)))


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, h0, cu_seqlens, silu, store_final):
    shape = (cu_seqlens.shape[0] - 1, x.shape[1], weight.shape[1] - 1) if store_final else (0,)
    return torch.empty_like(x), x.new_empty(shape, dtype=torch.float32)


@custom_op("seqmix::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(x: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor | None, cu_seqlens: Tensor,
                      silu: bool, dout: Tensor, dht: Tensor | None, need_dh0: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dweight [D, W], dbias [D] or empty, dh0 [N, D, W-1] or empty), the last three float32."""
    return tuple(_ext().causal_conv1d_bwd(x, weight, bias, h0, cu_seqlens, silu, dout, dht, need_dh0, _stream(x)))


@causal_conv1d_bwd.register_fake
def _(x, weight, bias, h0, cu_seqlens, silu, dout, dht, need_dh0):
    f32 = {"dtype": torch.float32}
    db = x.new_empty((x.shape[1],) if bias is not None else (0,), **f32)
    dh0 = x.new_empty((cu_seqlens.shape[0] - 1, x.shape[1], weight.shape[1] - 1) if need_dh0 else (0,), **f32)
    return torch.empty_like(x), x.new_empty(weight.shape, **f32), db, dh0


def _causal_setup(ctx, inputs, output):
    x, weight, bias, h0, cu_seqlens, silu, _ = inputs
    ctx.save_for_backward(x, weight, bias, h0, cu_seqlens)
    ctx.silu = silu


def _causal_backward(ctx, dout, dht):
    x, weight, bias, h0, cu_seqlens = ctx.saved_tensors
    dht = None if dht is None or dht.numel() == 0 else dht.float().contiguous()
    need_dh0 = h0 is not None and ctx.needs_input_grad[3]
    dx, dw, db, dh0 = causal_conv1d_bwd(x, weight, bias, h0, cu_seqlens, ctx.silu, dout.contiguous(), dht, need_dh0)
    return (dx, dw.to(weight.dtype), None if bias is None else db.to(bias.dtype), dh0 if need_dh0 else None,
            None, None, None)


causal_conv1d_fwd.register_autograd(_causal_backward, setup_context=_causal_setup)


@custom_op("seqmix::causal_conv1d_update", mutates_args=("state",))
def causal_conv1d_update(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """x [N, T, D]; state [N, D, W-1] float32, updated in place. Returns out [N, T, D]."""
    return _ext().causal_conv1d_update(x, state, weight, bias, silu, _stream(x))


@causal_conv1d_update.register_fake
def _(x, state, weight, bias, silu):
    return torch.empty_like(x)


# -- light_conv / dynamic_conv ---------------------------------------------------------------

@custom_op("seqmix::dynamic_conv_fwd", mutates_args=())
def dynamic_conv_fwd(x: Tensor, weight: Tensor, cu_seqlens: Tensor, heads: int, pad_left: int, softmax: bool,
                     seed_lo: int, threshold: int, scale: float) -> tuple[Tensor, Tensor]:
    """x [L, C] packed, weight [L, H, K] or [H, K] in x's dtype. Returns (out [L, C], lse [L, H] float32 or empty)."""
    return tuple(_ext().dynamic_conv_fwd(x, weight, cu_seqlens, heads, pad_left, softmax, seed_lo, threshold, scale,
                                         _stream(x)))


@dynamic_conv_fwd.register_fake
def _(x, weight, cu_seqlens, heads, pad_left, softmax, seed_lo, threshold, scale):
    return torch.empty_like(x), x.new_empty((x.shape[0] if softmax else 0, heads), dtype=torch.float32)


@custom_op("seqmix::dynamic_conv_bwd", mutates_args=())
def dynamic_conv_bwd(x: Tensor, weight: Tensor, lse: Tensor, dout: Tensor, cu_seqlens: Tensor, heads: int,
                     pad_left: int, softmax: bool, seed_lo: int, threshold: int, scale: float) -> tuple[Tensor, Tensor]:
    """Returns (dx [L, C], dweight in weight's shape and dtype)."""
    return tuple(_ext().dynamic_conv_bwd(x, weight, lse, dout, cu_seqlens, heads, pad_left, softmax, seed_lo,
                                         threshold, scale, _stream(x)))


@dynamic_conv_bwd.register_fake
def _(x, weight, lse, dout, cu_seqlens, heads, pad_left, softmax, seed_lo, threshold, scale):
    return torch.empty_like(x), torch.empty_like(weight)


def _dynamic_setup(ctx, inputs, output):
    x, weight, cu_seqlens, *ctx.args = inputs
    ctx.save_for_backward(x, weight, output[1], cu_seqlens)


def _dynamic_backward(ctx, dout, dlse):
    x, weight, lse, cu_seqlens = ctx.saved_tensors
    dx, dw = dynamic_conv_bwd(x, weight, lse, dout.contiguous(), cu_seqlens, *ctx.args)
    return (dx, dw) + (None,) * 7


dynamic_conv_fwd.register_autograd(_dynamic_backward, setup_context=_dynamic_setup)
