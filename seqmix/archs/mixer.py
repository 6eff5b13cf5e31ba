"""The one interface every sequence mixer implements, and the registry that builds them by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

State = dict[str, torch.Tensor]
DecodingStep = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]


class Mixer(nn.Module):
    """A sequence mixer: ``y, state = mixer(x, state=None, *, cu_seqlens=None, attention_mask=None)``.

    x and y are [B, T, hidden_size]. With ``state=None`` the call trains (no
    state comes back); with a state, from :meth:`init_state` or a previous
    call, it continues those sequences and returns the state after them, so
    prefilling in pieces and decoding one token at a time give the outputs of
    one full call. ``cu_seqlens`` ([N+1]) packs N sequences as [1, sum(T_i), hidden];
    ``attention_mask`` ([B, T], 1 for real tokens, e.g. left padding) leaves the
    masked tokens out altogether: they neither read nor change the state, and
    their outputs are zero.

    A call without tokens (B = 0 or T = 0) returns an empty output and the state unchanged.

    Subclasses implement :meth:`mix` on packed or dense inputs with at least one token, and :meth:`init_state`.
    """

    hidden_size: int
    #: values of the constructor's ``backend=`` besides None (automatic); the tests run each.
    backends: tuple[str, ...] = ("reference", "triton")

    def forward(self, x, state: State | None = None, *, cu_seqlens=None, attention_mask=None, **options):
        """``options`` go to :meth:`mix` (mixers that take more than the common arguments, e.g. ``num_steps``)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [B, T, hidden_size={self.hidden_size}], got {got}")
        if state is not None:
            _check_state_batch(state, x, cu_seqlens, attention_mask)
        B, T, _ = x.shape
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError("give attention_mask or cu_seqlens, not both")
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (B, T):
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
                raise ValueError(f"attention_mask must have shape [B, T] = {(B, T)}, got {got}")
        if B * T == 0:  # no tokens: nothing to mix, no state to change
            return x * 0, state
        if attention_mask is None:
            return self.mix(x, state, cu_seqlens=cu_seqlens, **options)
        keep = attention_mask.to(device=x.device, dtype=torch.bool)
        cu = torch.zeros(B + 1, dtype=torch.int64, device=x.device)
        cu[1:] = keep.sum(1).cumsum(0)
        y_packed, state = self.mix(x[keep].unsqueeze(0), state, cu_seqlens=cu, **options)
        y = y_packed.new_zeros(B, T, y_packed.shape[-1])
        y[keep] = y_packed[0]
        return y, state

    def mix(self, x, state: State | None, *, cu_seqlens=None) -> tuple[torch.Tensor, State | None]:
        raise NotImplementedError

    def _decoding_constant(self, name: str, parameters, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, a tensor made from ``parameters`` alone (a concatenation of weights, -exp(A_log)), for
        a decoding step: without gradients and outside torch.compile, the result of the last call while every
        parameter keeps its storage, dtype, device and version counter (which every in-place write advances,
        an optimizer's step and load_state_dict included), kept under ``name`` (DeltaNet's concatenations were
        ~15% of a decoded token's profiled time: docs/design.md, "CPU references (issue 14)", third round)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return compute()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in parameters)
        cached = self.__dict__.get(name)
        if cached is None or cached[0] != key:
            cached = self.__dict__[name] = (key, compute())
        return cached[1]

    def cpu_decoding_step(self, like: torch.Tensor, state: State) -> DecodingStep | None:
        """The layer's one-token decoding step as one C++ call (seqmix/kernels/step_cpu.py) bound to its weights
        as they are now, for a loop of steps that leaves them unchanged (:meth:`LanguageModel.generate`'s):
        ``y, state = step(x, state)`` with x and y [B, hidden], the state as :meth:`forward` takes and returns
        it. None where the layer has no such step or it does not serve inputs like ``like`` (their dtype and
        device) and ``state``; :meth:`forward` serves those. :meth:`mix` takes the same step for a decoding call
        (:func:`take_step`), so the two give the same outputs."""
        return None

    def init_state(self, batch_size: int) -> State:
        """The state before any token, for ``batch_size`` sequences."""
        raise NotImplementedError

    def sequence_state(self, state: State, i: int) -> State:
        """The part of a batch's state that belongs to sequence ``i``."""
        return {name: value[i] for name, value in state.items()}

    def observe_tokens(self, tokens: torch.Tensor) -> None:
        """The token ids [B, T] of the call about to run; the LM shows them to each layer before calling it.
        Most mixers ignore them (the hourglass's whitespace boundaries read them)."""

    def auxiliary(self, logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """What the last training call (state=None, gradients on) leaves for the trainer, then forgets:
        ``"loss"``, a weighted scalar to add to the LM loss, and any other scalars to log (detached).
        ``logits`` are the LM's output of that call, for losses that need them. Empty by default."""
        return {}


def is_decoding_step(x: torch.Tensor, state: State | None, cu_seqlens: torch.Tensor | None) -> bool:
    """Whether a :meth:`Mixer.mix` call is one decoding step: a state, one token per sequence, dense
    (no ``cu_seqlens``; an ``attention_mask`` arrives as ``cu_seqlens``). The mixers run such calls through
    their families' one-token steps (docs/design.md, "The decoding step"); the test reads only shapes and
    arguments, never values, so it is fixed while ``torch.compile`` traces."""
    return state is not None and cu_seqlens is None and x.shape[1] == 1


def take_step(step: DecodingStep, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
    """A bound one-token step (:meth:`Mixer.cpu_decoding_step`) on a decoding call's x [B, 1, hidden]: returns
    (y [B, 1, hidden], the new state)."""
    B, _, D = x.shape
    y, state = step(x.view(B, D), state)
    return y.view(B, 1, D), state


def _check_state_batch(state, x, cu_seqlens, attention_mask) -> None:
    """Every state tensor's leading dim is the number of sequences the call continues (x's batch, the
    attention mask's, or len(cu_seqlens) - 1): said here in the layer's terms, before an inner op
    reports it as one of its own arguments."""
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict of tensors (from init_state or a previous call), got "
                         f"{type(state).__name__}")
    if cu_seqlens is not None and isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1:
        n, source = cu_seqlens.shape[0] - 1, "len(cu_seqlens) - 1 = {} packed sequences"
    elif attention_mask is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        n, source = attention_mask.shape[0], "attention_mask's batch of {}"
    else:
        n, source = x.shape[0], "x's batch of {}"
    # Runs on every call, decoding steps included: the messages are formatted only when raised.
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"state[{name!r}] must be a tensor with one row per sequence, got {got}")
        if value.shape[0] != n:
            raise ValueError(f"state[{name!r}] holds {value.shape[0]} sequence(s) (shape {tuple(value.shape)}), "
                             f"but the call continues {n}: {source.format(n)}")


MIXERS: dict[str, type[Mixer]] = {}


def register_mixer(name: str) -> Callable[[type[Mixer]], type[Mixer]]:
    def register(cls: type[Mixer]) -> type[Mixer]:
        if name in MIXERS:
            raise ValueError(f"a mixer named {name!r} is registered already ({MIXERS[name].__name__})")
        MIXERS[name] = cls
        return cls

    return register


def build_mixer(name: str, **config) -> Mixer:
    """Build a registered mixer, e.g. ``build_mixer("deltanet", hidden_size=512, num_heads=4)``."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered: {sorted(MIXERS)}")
    return MIXERS[name](**config)


def init_mixer_state(mixer: Mixer, batch_size: int, **options) -> State:
    """``mixer.init_state(batch_size, ...)`` with those of ``options`` (e.g. ``num_steps``, ``capacity``) that its
    ``init_state`` takes and that are not None."""
    params = inspect.signature(mixer.init_state).parameters
    return mixer.init_state(batch_size, **{k: v for k, v in options.items() if k in params and v is not None})


def with_parent_backend(name: str, backend: str | None, options: dict) -> dict:
    """Constructor options of mixer ``name`` built inside another layer: the parent's ``backend`` when
    ``name`` takes it (a layer built with ``backend="reference"`` runs no fused kernel at all), unless
    ``options`` name one. An unknown ``name`` is left to :func:`build_mixer` to report."""
    cls = MIXERS.get(name)
    if cls is not None and backend in cls.backends and "backend" in inspect.signature(cls).parameters:
        return {"backend": backend, **options}
    return dict(options)

