"""Choosing the implementation that serves an op call: reference, triton or cuda.

Every public op names the backends it implements, most preferred first. A
backend asked for by name (the op's ``backend=`` argument) must serve the call
or raise :class:`BackendUnavailable` saying why. The environment variable
``SEQMIX_BACKEND`` names a backend for every op that implements it; ops that
do not fall back to the automatic choice, so one setting can steer a whole
model whose ops are at different stages. The automatic choice takes the first
implemented backend that can serve the call: Triton (or CUDA) on CUDA
tensors, the reference on CPU tensors unless Triton's interpreter is on, and
the reference wherever a fused kernel does not take the call's dtype or sizes.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("reference", "triton", "cuda")


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot serve the call."""


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_extension():
    """The compiled ``seqmix._C`` module, or None when it was not built."""
    try:
        from seqmix import _C
    except ImportError:
        return None
    return _C


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device``; None when it can."""
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
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def select_backend(
    op: str,
    requested: str | None,
    device: torch.device,
    implemented: tuple[str, ...],
    limits: dict[str, str | None] | None = None,
) -> str:
    """The backend that serves one call of ``op``.

    ``implemented`` lists the op's backends, most preferred first. ``limits``
    maps a backend to why it cannot serve this particular call (a dtype or a
    size it does not support), None where it can.
    """

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
        return requested
    env = os.environ.get("SEQMIX_BACKEND") or None
    if env is not None:
        if env not in BACKENDS:
            raise ValueError(f"SEQMIX_BACKEND must be one of {BACKENDS}, got {env!r}")
        if env in implemented:
            return select_backend(op, env, device, implemented, limits)
    for name in implemented:
        if reason(name) is None:
            return name
    raise BackendUnavailable(f"{op}: none of {implemented} can serve this call on {device}")
