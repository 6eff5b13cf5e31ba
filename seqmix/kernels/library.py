"""seqmix's kernels as ``torch.library`` custom ops that eager calls reach without torch.library's dispatch.

A custom op is what ``torch.compile`` needs to trace a kernel it cannot see into: a schema, a fake (shape-only)
implementation and an autograd formula. In eager mode the same op is slow to call: torch.library's Python
dispatch (the autograd key's ``autograd.Function``, a redispatch to the backend key, the schema's defaults
filled in argument by argument, the outputs' aliasing checked) costs ~0.15-0.3 ms a forward and backward on
a 2-core CPU: more than the kernels themselves for a short batch, a fifth of the tiny LM's training step at
B1 T16 and 1-3% at B16 T128 (docs/design.md, "Sixteenth round").

:func:`custom_op` defines the op as torch.library does and returns a :class:`CustomOp`, which

- under ``torch.compile`` calls the torch.library op (``.op``): the graph holds it, its fake and its autograd;
- in eager mode, on plain tensors with no dispatch mode active, calls the op's Python implementation directly,
  inside a ``torch.autograd.Function`` made of the same ``setup_context`` and ``backward`` when an input wants
  a gradient;
- hands everything else to the torch.library op: tensor subclasses, dispatch modes (fake tensors, the
  tracing of a compiled backward, which calls the backward's ops on them) and torch.func's transforms (whose
  wrapped tensors look plain), an op without autograd called on inputs that want a gradient (torch's own
  error), and ``torch.library.opcheck(op.op, ...)``.

Ops take positional arguments only (their schemas have no defaults), so that ``setup_context`` sees the
same inputs on both paths.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["CustomOp", "autocast_off", "custom_op", "forward_outputs"]


class CustomOp:
    """A torch.library custom op (``op``, named ``name``: "namespace::op") and its Python implementation
    (``fn``); see the module docstring."""

    def __init__(self, name: str, op, fn: Callable):
        self.name, self.op, self.fn = name, op, fn
        self._function = None  # the eager autograd.Function, once register_autograd has been called
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__

    def register_fake(self, fake: Callable) -> Callable:
        return self.op.register_fake(fake)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """``backward(ctx, *grads)`` and ``setup_context(ctx, inputs, output)`` as torch.library takes them,
        for both paths."""
        self.op.register_autograd(backward, setup_context=setup_context)
        fn = self.fn

        def forward(ctx, *inputs):
            output = fn(*inputs)
            setup_context(ctx, inputs, output)
            return output

        # Named after the op (seqmix::ssd_cpu_chunk_fwd -> seqmix_ssd_cpu_chunk_fwd): what profiles show.
        self._function = type(self.name.replace("::", "_"), (torch.autograd.Function,),
                              {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        if not _eager(args):
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return self.op(*args) if self._function is None else self._function.apply(*args)
        return self.fn(*args)

    def bind(self, *fixed) -> Callable:
        """The op for a caller that binds it once and then calls it many times under the conditions of now, with
        ``fixed`` among every call's arguments and the others its own outputs or tensors like them (the layers'
        bound decoding steps, :meth:`seqmix.archs.Mixer.cpu_decoding_step`): the Python implementation itself
        where a call made now would run it (eagerly, autograd off, ``fixed`` plain), skipping :meth:`__call__`'s
        checks of every call (~1-1.5 us each; docs/design.md, "Twenty-first round"); else the op, as
        :meth:`__call__` would choose per call."""
        return self.fn if _eager(fixed) and not torch.is_grad_enabled() else self


def _eager(args: Iterable) -> bool:
    """Whether a call on ``args`` made now may skip torch.library: not compiling, no dispatch mode or torch.func
    transform active, every argument plain."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._are_functorch_transforms_active()) and _plain(args)


def _plain(args: Iterable) -> bool:
    """Whether every argument is a plain tensor (or parameter) or one of the schemas' plain values: no tensor
    subclass with its own dispatch. A loop over exact types: 0.6 us for 13 arguments, half or less of an
    isinstance-based check's cost (a decoding step makes a few such calls per layer)."""
    for a in args:
        if type(a) not in _PLAIN_TYPES:
            return False
    return True


# The types of the ops' arguments (Tensor, Tensor | None, bool, int, float, list[bool]) as callers pass them.
_PLAIN_TYPES = frozenset((Tensor, torch.nn.Parameter, type(None), bool, int, float, list))


def custom_op(name: str, *, mutates_args: Iterable[str] | str = ()) -> Callable[[Callable], CustomOp]:
    """``torch.library.custom_op(name, mutates_args=...)`` as a decorator returning a :class:`CustomOp`."""
    def define(fn: Callable) -> CustomOp:
        return CustomOp(name, torch.library.custom_op(name, mutates_args=mutates_args)(fn), fn)

    return define


def forward_outputs(*outputs):
    """What an ``autograd.Function``'s forward returns: ``outputs`` as they are in eager mode; while
    ``torch.compile`` traces the forward, each tensor as a view of itself (``view_as``: a new tensor object,
    no copy), as Dynamo itself does for an input returned as an output.

    torch 2.11's Dynamo makes every intermediate value of a traced forward an extra output of the
    ``autograd.Function`` it builds (2.13 leaves out those aliasing an output: ``filter_aliased_intermediates``).
    A result that is at run time the very tensor object of an intermediate (an in-place op's result,
    ``y = x.mul(r).mul_(w)``; a ``.to()`` or ``.contiguous()`` that changes nothing) is then returned twice,
    autograd keeps the last of its output slots, and its gradient reaches ``backward`` in an ignored slot:
    the compiled step silently computed zero gradients where eager did not."""
    if torch.compiler.is_compiling():
        outputs = tuple(t.view_as(t) if isinstance(t, Tensor) else t for t in outputs)
    return outputs[0] if len(outputs) == 1 else outputs


def autocast_off(fn: Callable) -> Callable:
    """``fn`` run with autocast off on its tensors' device: a reference op, or an ``autograd.Function``'s backward
    (which runs wherever ``backward()`` is called).

    The references compute in their own dtype (float32 for half inputs: ``sequences.reference_dtype``).
    Under autocast their products came out in bfloat16 next to float32 states, ``torch.linalg.solve_triangular``
    has no bfloat16 kernel, and a backward met an output gradient in bfloat16 next to its float32 recomputed
    factors: the trainer failed on a GPU with ``SEQMIX_BACKEND=reference``."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if device is None or not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return run
