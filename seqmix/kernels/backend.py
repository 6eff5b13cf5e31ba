"""Choosing the implementation that serves an op call: reference, triton, cuda or cpu (C++ CPU kernels).

Every public op names the backends it implements, most preferred first. A
backend asked for by name (the op's ``backend=`` argument) must serve the call
or raise :class:`BackendUnavailable` saying why. The environment variable
``SEQMIX_BACKEND`` names a backend for every op that implements it; ops that
do not fall back to the automatic choice, so one setting can steer a whole
model whose ops are at different stages. The automatic choice takes the first
implemented backend that can serve the call: Triton (or CUDA) on CUDA
tensors; on CPU tensors the C++ CPU kernels where an op has them and they
built, else the reference unless Triton's interpreter is on; and the reference
wherever a fused kernel does not take the call's dtype or sizes.

Every choice can be seen: :func:`explain` reports the one an op would make for
given inputs, :func:`recording` collects those a piece of code makes, and the
logger ``seqmix.kernels`` logs each at DEBUG level (off unless configured).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu")
# The device each fused backend runs on: a backend passed over for needing another device is said once as
# "CPU tensors" / "CUDA tensors"; one for this device that cannot run (cpu not built) is news, said in full.
_HOME_DEVICE = {"triton": "cuda", "cuda": "cuda", "cpu": "cpu"}
logger = logging.getLogger("seqmix.kernels")


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot serve the call."""


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_importable() -> bool:
    """Whether Triton is installed, found without importing it (seqmix/kernels/triton_limits.py says why)."""
    if "triton" in sys.modules:  # imported already, or blocked (None)
        return sys.modules["triton"] is not None
    return importlib.util.find_spec("triton") is not None


class LazyModule:
    """The module ``name``, imported at the first access of one of its attributes rather than now: a family's
    Triton kernels, whose import a process that never calls them should not pay (seqmix/kernels/triton_limits.py).
    Not a module object and not in ``sys.modules`` until imported: code that walks ``sys.modules`` and reads each
    module's attributes (``inspect.getmodule``, which torch._dynamo's import and every optimizer's construction
    reach) would otherwise import them all. Code that ``torch.compile`` traces must not reach into it: the
    kernels run inside custom ops, whose bodies are not traced."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def cuda_extension():
    """The compiled ``seqmix._C`` module, or None when it was not built."""
    try:
        from seqmix import _C
    except ImportError:
        return None
    return _C


def why_unavailable(backend: str, device: torch.device, build: bool = True) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device``; None when it can. ``build=False``: the C++ CPU
    kernels count only when they serve without a compile (:func:`seqmix.kernels.cpu.ready`)."""
    if backend == "reference":
        return None
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"Triton kernels need CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to run them on the CPU"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors (got {device.type})"
        ext = cuda_extension()
        if ext is None:
            return "the CUDA extension seqmix._C was not built (see setup.py)"
        major, minor = torch.cuda.get_device_capability(device)
        if major * 10 + minor not in ext.cuda_archs():
            return f"seqmix._C was compiled for compute capabilities {ext.cuda_archs()}, not this GPU's {major}.{minor}"
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the C++ CPU kernels need CPU tensors (got {device.type})"
        from seqmix.kernels import cpu

        if not build and not cpu.ready():
            return "the C++ CPU kernels are not compiled here yet (python -m seqmix.kernels.build compiles them)"
        return cpu.unavailable()
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


@dataclass(frozen=True)
class Choice:
    """The backend that serves one call of ``op``, how it was chosen (``"argument"``: the op's ``backend=``,
    ``"SEQMIX_BACKEND"``, or ``"automatic"``) and the more preferred backends ``passed_over`` (backend, why
    not, whether the reason is the call's own dtype or sizes rather than the device)."""

    op: str
    backend: str
    how: str
    device: torch.device
    passed_over: tuple[tuple[str, str, bool], ...] = ()

    @property
    def reason(self) -> str:
        """Why this backend, in a few words: "CPU tensors", "CUDA tensors", "SEQMIX_BACKEND=reference", or
        why a more preferred backend does not take the call."""
        if self.how == "argument":
            return f"asked for with backend={self.backend!r}"
        if self.how == "SEQMIX_BACKEND":
            return f"SEQMIX_BACKEND={self.backend}"
        where = f"{self.device.type.upper()} tensors"
        if self.backend == "triton" and self.device.type == "cpu":
            where += " under Triton's interpreter (TRITON_INTERPRET=1)"
        if not self.passed_over:
            return where
        # Backends for another device are said once as "CPU tensors" / "CUDA tensors"; those for this one are news.
        elsewhere = [not call and _HOME_DEVICE.get(name) != self.device.type for name, _, call in self.passed_over]
        parts = [where] if any(elsewhere) else []
        parts += [f"{name} does not take this call: {why}" if call else f"{name}: {why}"
                  for (name, why, call), other in zip(self.passed_over, elsewhere) if not other]
        return "; ".join(parts)

    def __str__(self) -> str:
        return f"{self.op}: {self.backend} ({self.reason})"


# Callables that see every Choice (see `recording` and `explain`); empty unless one of them is running.
_watchers: list[Callable[[Choice], None]] = []


def select_backend(
    op: str,
    requested: str | None,
    device: torch.device,
    implemented: tuple[str, ...],
    limits: dict[str, str | None] | None = None,
    build_cpu: bool = True,
) -> str:
    """The backend that serves one call of ``op``.

    ``implemented`` lists the op's backends, most preferred first. ``limits``
    maps a backend to why it cannot serve this particular call (a dtype or a
    size it does not support), None where it can. ``build_cpu=False``: the
    automatic choice takes the C++ CPU kernels only where they serve without a
    compile (ops whose reference is fast enough that a short run should not wait
    for one); asked for by name, they are built. The choice goes to the
    ``seqmix.kernels`` logger (DEBUG) and to :func:`recording` / :func:`explain`;
    with neither on, that costs one check (:func:`reporting`). Choices made while
    ``torch.compile`` traces are not reported (Dynamo cannot trace a logger).
    """
    name, how, passed_over = _choose(op, requested, device, implemented, limits, build_cpu)
    if reporting():
        report(Choice(op, name, how, device, tuple(passed_over)))
    return name


def reporting() -> bool:
    """Whether choices are being watched (:func:`recording`, :func:`explain`) or logged at DEBUG level: code
    that chooses outside :func:`select_backend` builds its :class:`Choice` only then."""
    return not torch.compiler.is_compiling() and (bool(_watchers) or logger.isEnabledFor(logging.DEBUG))


def report(choice: Choice) -> None:
    """Log ``choice`` (DEBUG) and show it to the watchers."""
    logger.debug("%s", choice)
    for watch in _watchers:
        watch(choice)


def _choose(op, requested, device, implemented, limits, build_cpu) -> tuple[str, str, list[tuple[str, str, bool]]]:
    """(backend, how it was chosen, the preferred backends passed over) for :func:`select_backend`."""

    def reason(name: str) -> str | None:
        return why_unavailable(name, device) or (limits or {}).get(name)

    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {requested!r}")
        if requested not in implemented:
            raise BackendUnavailable(f"{op} has no {requested!r} backend; it has {implemented}")
        why = reason(requested)
        if why is not None:
            raise BackendUnavailable(f"{op}: backend {requested!r} cannot serve this call: {why}")
        return requested, "argument", []
    env = os.environ.get("SEQMIX_BACKEND") or None
    if env is not None:
        if env not in BACKENDS:
            raise ValueError(f"SEQMIX_BACKEND must be one of {BACKENDS}, got {env!r}")
        if env in implemented:
            return _choose(op, env, device, implemented, limits, build_cpu)[0], "SEQMIX_BACKEND", []
    passed_over = []
    for name in implemented:
        device_why = why_unavailable(name, device, build_cpu)
        why = device_why or (limits or {}).get(name)
        if why is None:
            return name, "automatic", passed_over
        passed_over.append((name, why, device_why is None))
    raise BackendUnavailable(f"{op}: none of {implemented} can serve this call on {device}")


@contextlib.contextmanager
def recording() -> Iterator[list[Choice]]:
    """Collect the :class:`Choice` of every op called inside the ``with`` block, in call order."""
    choices: list[Choice] = []
    _watchers.append(choices.append)
    try:
        yield choices
    finally:
        _watchers.remove(choices.append)


class _Explained(Exception):
    def __init__(self, choice: Choice):
        super().__init__(str(choice))
        self.choice = choice


def explain(op: str | Callable, *args, **kwargs) -> Choice:
    """The backend that ``op`` (a function of :mod:`seqmix.kernels` or its name) would run for these
    arguments, and why, without running it: the op checks its inputs (bad ones raise as in a real call)
    and makes its choice, then stops. ``backend=`` among ``kwargs`` is the op's own argument.

    >>> explain("delta_rule", q, k, v, beta)   # doctest: +SKIP
    Choice(op='delta_rule', backend='reference', ...)   # str(): "delta_rule: reference (CPU tensors)"
    """
    if isinstance(op, str):
        from seqmix import kernels

        if op not in kernels.__all__ or op in ("explain", "BackendUnavailable"):
            raise ValueError(f"op: no op named {op!r} in seqmix.kernels")
        op = getattr(kernels, op)

    def stop(choice: Choice) -> None:
        raise _Explained(choice)

    _watchers.append(stop)
    try:
        # Ops that draw a seed (dynamic_conv's DropConnect) do it before choosing: leave the generator as it was.
        with torch.random.fork_rng(devices=[]):
            op(*args, **kwargs)
    except _Explained as e:
        return e.choice
    finally:
        _watchers.remove(stop)
    raise ValueError(f"op: {getattr(op, '__name__', op)!r} returned without choosing a backend (not a seqmix op)")
