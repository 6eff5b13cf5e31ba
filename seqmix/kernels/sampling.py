"""Drawing a token from each row of logits: :meth:`LanguageModel.generate`'s sampler (temperature, top-k).

The draw is the exponential race: with E_i ~ Exp(1) independent, argmax_i p_i / E_i is i with probability p_i. With
E = -log(U) from uniforms U in [0, 1) (clamped off 0, where a sole kept token would tie with the left-out zeros),
that is argmin_i p_i / log(U_i), and p may stay unnormalised (the softmax's sum divides every ratio alike). It
replaces ``torch.multinomial``, whose checks and cumulative sums cost ~20 us a token on the CPU, and it neither
synchronises with the host nor changes shape.

On CPU tensors in float32 or float64 the C++ kernel (sample_cpu.cpp) draws the rows in one call once it is
compiled; elsewhere the tensor ops (:func:`sample_reference`). Both read the same uniforms, drawn from the caller's
generator, so they draw the same tokens but where two candidates' ratios agree to their last bits (the
exponentials round differently).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import Tensor

from seqmix.kernels import cpu
from seqmix.kernels.backend import select_backend

__all__ = ["sample_reference", "token_sampler"]

DTYPES = (torch.float32, torch.float64)


def sample_reference(logits: Tensor, uniforms: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """One token per row of logits [B, V] at ``temperature`` > 0 among the ``top_k`` largest (None: all; ties
    with the k-th kept), drawn with uniforms [B, V] in [0, 1) (consumed); returns [B, 1] (int64), in tensor ops."""
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    log_u = uniforms.clamp_min_(torch.finfo(uniforms.dtype).tiny).log_()
    return (logits.softmax(-1) / log_u).argmin(-1, keepdim=True)


def token_sampler(temperature: float, top_k: int | None, generator: torch.Generator | None, like: Tensor, *,
                  backend: str | None = None) -> Callable[[Tensor], Tensor]:
    """The sampler of a generation whose logits are [B, V] like ``like``: a function of logits [B, V] that returns
    one token per row, [B, 1] (int64). ``temperature=0`` is greedy (argmax); otherwise each call draws B V
    uniforms from ``generator`` (None: torch's default) and one token per row from softmax(logits / temperature)
    over the ``top_k`` largest logits (None: all; ties with the k-th kept).

    ``backend``: None (automatic: ``"cpu"`` on CPU tensors in float32 or float64 once the C++ kernels are
    compiled, else ``"reference"``), ``"cpu"`` (builds them) or ``"reference"``. Chosen once, here: a choice per
    token would cost a few microseconds of each.
    """
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}") from None
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if like.dim() != 2 or like.shape[1] == 0:
        raise ValueError(f"logits must be [B, V] with V >= 1, got {tuple(like.shape)}")
    vocab = like.shape[1]
    if top_k is not None:
        try:
            top_k = operator.index(top_k)
        except TypeError:
            raise ValueError(f"top_k must be an int in [1, V={vocab}], got {top_k!r}") from None
        if not 1 <= top_k <= vocab:
            raise ValueError(f"top_k must be an int in [1, V={vocab}], got {top_k}")
    if temperature == 0:
        return lambda logits: logits.argmax(-1, keepdim=True)
    unsupported = None if like.dtype in DTYPES else f"logits must be float32 or float64, got {like.dtype}"
    name = select_backend("sample_tokens", backend, like.device, ("cpu", "reference"), {"cpu": unsupported},
                          build_cpu=False)

    def uniforms(logits: Tensor) -> Tensor:
        return torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)

    if name == "reference":
        return lambda logits: sample_reference(logits, uniforms(logits), temperature, top_k)
    rows = cpu.extension().sample_rows

    def draw(logits: Tensor) -> Tensor:
        logits = logits.contiguous()
        return rows(logits, uniforms(logits), temperature, top_k or 0)

    return draw
