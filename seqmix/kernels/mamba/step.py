"""One decoding step of Mamba-1's selective scan: one token per sequence, the state updated in a few
tensor ops (docs/math/mamba.md, "One token"; docs/design.md, "The decoding step").

No host synchronisation, static shapes; the returned state is a new tensor (the one passed in stays
valid). On CPU tensors without a gradient it is one call of the C++ kernel (backend "cpu", when it
built); otherwise a handful of tensor ops, differentiable by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqmix.kernels import step_cpu
from seqmix.kernels.backend import select_backend
from seqmix.kernels.checks import check_tensor
from seqmix.kernels.mamba import cpu as cpu_kernels
from seqmix.kernels.mamba.reference import process_delta
from seqmix.kernels.op import wants_grad
from seqmix.kernels.sequences import reference_dtype


def selective_scan_step(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        state: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                        delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                        backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`seqmix.kernels.selective_scan`: per channel d,
    ``h' = exp(delta' A) h + delta' u B``, ``y = h' . C + D u``, ``y *= silu(z)``, with
    ``delta' = softplus?(delta + delta_bias)``.

    Args:
        u: [Bsz, D] the token's inputs.
        delta: [Bsz, D] step sizes (before bias and softplus).
        A: [D, N] negative decay rates.
        B: [Bsz, N] or [Bsz, G, N] input projections (channel d reads group d // (D / G)).
        C: B's shape: output projections.
        state: [Bsz, D, N] the state before the token (float32 by convention).
        D: [D] skip, or None. z: [Bsz, D] gate, or None. delta_bias: [D] or None.
        delta_softplus: as :func:`seqmix.kernels.selective_scan`.
        backend: None (automatic: the C++ kernel on CPU tensors when no gradient is wanted and it built),
            ``"cpu"`` or ``"reference"`` (the tensor ops).

    Returns:
        y: [Bsz, D] in u's dtype.
        state: [Bsz, D, N] after the token, float32 (float64 for float64 inputs); a new tensor.
    """
    check_tensor("u", u, (None, None), dims="[Bsz, D]")
    Bsz, Dm = u.shape
    check_tensor("delta", delta, (Bsz, Dm), dims="[Bsz, D]", like=u)
    check_tensor("A", A, (Dm, None), dims="[D, N]", like=u)
    N = A.shape[1]
    if B.dim() == 2:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    check_tensor("B", B, (Bsz, None, N), dims="[Bsz, N] or [Bsz, G, N]", like=u)
    G = B.shape[1]
    if G == 0 or Dm % G:
        raise ValueError(f"B's groups G={G} must divide the channels D={Dm}")
    check_tensor("C", C, B.shape, dims="B's shape", like=u)
    check_tensor("state", state, (Bsz, Dm, N), dims="[Bsz, D, N]", like=u)
    return selective_scan_step_unchecked(u, delta, A, B, C, state, D, z, delta_bias, delta_softplus, backend)


def selective_scan_step_unchecked(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                                  C: torch.Tensor, state: torch.Tensor, D: torch.Tensor | None = None,
                                  z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                                  delta_softplus: bool = False, backend: str | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`selective_scan_step` without its argument checks, for a caller whose inputs have the right shapes,
    devices and dtypes by construction (seqmix/archs/mamba.py's layer): the checks cost about half of a step at
    decoding sizes. Same arguments (B, C ``[Bsz, G, N]`` or ``[Bsz, N]``) and results."""
    Bsz, Dm = u.shape
    N = A.shape[1]
    if B.dim() == 2:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    G = B.shape[1]
    if _takes_cpu(backend, u, delta, A, B, C, state, D, z, delta_bias):
        return cpu_kernels.scan_step(u, delta, A, B, C, state, D, z, delta_bias, delta_softplus)
    cd = reference_dtype(u)
    delta = process_delta(delta.to(cd), None if delta_bias is None else delta_bias.to(cd), delta_softplus)
    # Groups to channels by a broadcast view: [Bsz, G, 1, N] -> [Bsz, D, N].
    B, C = (t.to(cd).unsqueeze(2).expand(Bsz, G, Dm // G, N).reshape(Bsz, Dm, N) for t in (B, C))
    uc = u.to(cd)
    h = torch.addcmul(state.to(cd) * (delta.unsqueeze(-1) * A.to(cd)).exp(), (delta * uc).unsqueeze(-1), B)
    y = (h.unsqueeze(-2) @ C.unsqueeze(-1)).view(Bsz, Dm)
    if D is not None:
        y = torch.addcmul(y, D.to(cd), uc)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(u.dtype), h


def _takes_cpu(backend: str | None, u: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether the C++ step serves this call: the automatic choice through step_cpu's quick test where the
    dtype allows it, else (a backend named, or a dtype the C++ kernel lacks) select_backend with both limits."""
    dtype_limit = cpu_kernels.unsupported(u.dtype)
    if backend is None and dtype_limit is None:
        return step_cpu.serves("selective_scan_step", u, u, *tensors)
    grad_limit = "a gradient is wanted" if wants_grad(u, *tensors) else None
    return select_backend("selective_scan_step", backend, u.device, ("cpu", "reference"),
                          {"cpu": dtype_limit or grad_limit}) == "cpu"
