"""The shared building blocks' hand-written backwards (RMSNorm with and without its gate, l2_normalize) against
autograd through their plain formulas in float64, and their float32 results against the same."""

import pytest
import torch
import torch.nn.functional as F

from seqmix.archs.modules import RMSNorm, l2_normalize
from seqmix.kernels.backend import recording
from tests.helpers import assert_rel, require_cpu_kernels

SHAPE = (2, 5, 3, 16)  # [B, T, H, D]: per head, as the mixers' output norms


def _rms_norm_formula(x, weight, gate, eps):
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight
    return y if gate is None else y * F.silu(gate)


def _l2_formula(x, eps):
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def _inputs(seed, gated, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=dtype).requires_grad_()
    gate = torch.randn(SHAPE, generator=g, dtype=dtype).requires_grad_() if gated else None
    return x, gate, torch.randn(SHAPE, generator=g, dtype=dtype), torch.randn(SHAPE[-1], generator=g, dtype=dtype)


def _grads(y, dy, inputs):
    return torch.autograd.grad((y * dy).sum(), [t for t in inputs if t is not None])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize("gated", [False, True])
def test_rms_norm_matches_the_formula(gated, dtype, tol):
    """Output and the gradients of x, weight and gate (dy random, weight random rather than ones)."""
    x, gate, dy, weight = _inputs(0, gated, dtype)
    norm = RMSNorm(SHAPE[-1], eps=1e-3).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    y = norm(x, gate)
    want = _rms_norm_formula(x, norm.weight, gate, norm.eps)
    assert_rel(y, want, tol, "output")
    for name, a, b in zip(("x", "weight", "gate"), _grads(y, dy, (x, norm.weight, gate)),
                          _grads(want, dy, (x, norm.weight, gate)), strict=False):
        assert_rel(a, b, tol, f"d{name}")
    with torch.no_grad():  # the forward alone (no autograd.Function) gives the same output
        assert_rel(norm(x, gate), want, tol, "output without autograd")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_l2_normalize_matches_the_formula(dtype, tol):
    x, _, dy, _ = _inputs(1, False, dtype)
    x.data[0, 0, 0] *= 1e-4  # a short row, where eps matters
    y, want = l2_normalize(x, eps=1e-6), _l2_formula(x, 1e-6)
    assert_rel(y, want, tol, "output")
    assert_rel(_grads(y, dy, (x,))[0], _grads(want, dy, (x,))[0], tol, "dx")
    with torch.no_grad():
        assert_rel(l2_normalize(x, eps=1e-6), want, tol, "output without autograd")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_l2_normalize_for_training_takes_each_backend(backend, dtype, tol, monkeypatch):
    """Under autograd on the CPU: the C++ kernels (the automatic choice once compiled) and the tensor ops
    (SEQMIX_BACKEND=reference) against the formula, output and dx, on rows whose sizes are not a multiple of a
    vector and a strided input; the C++ ops under opcheck."""
    require_cpu_kernels()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if backend == "reference":
        monkeypatch.setenv("SEQMIX_BACKEND", "reference")
    else:
        monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(3, 7, 2, 40, generator=g, dtype=dtype).requires_grad_()
    x = rows[..., 3:36]  # [3, 7, 2, 33], strided
    dy = torch.randn(x.shape, generator=g, dtype=dtype)
    with recording() as choices:
        y = l2_normalize(x, eps=1e-6)
    assert [c.backend for c in choices if c.op == "l2_normalize"] == [backend]
    want = _l2_formula(x, 1e-6)
    assert y.dtype == dtype
    assert_rel(y, want, tol, "output")
    assert_rel(_grads(y, dy, (rows,))[0], _grads(want, dy, (rows,))[0], tol, "dx")
    if backend == "cpu":
        x2d = x.detach().reshape(-1, 33).contiguous()
        y2d, rstd = torch.ops.seqmix.l2_norm_cpu_fwd(x2d, 1e-6)
        torch.library.opcheck(torch.ops.seqmix.l2_norm_cpu_fwd.default, (x2d, 1e-6))
        torch.library.opcheck(torch.ops.seqmix.l2_norm_cpu_bwd.default, (x2d, rstd, dy.reshape(-1, 33).contiguous()))


def test_norms_keep_low_precision_dtypes_and_gradcheck():
    """bf16 in, bf16 out (computed in float32); finite differences of both backwards in float64."""
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    assert RMSNorm(8)(x, x).dtype == torch.bfloat16 and l2_normalize(x).dtype == torch.bfloat16
    g = torch.Generator().manual_seed(2)
    x, gate = (torch.randn(2, 3, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    weight = torch.randn(8, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w, b: _rms_norm_with(a, w, b), (x, weight, gate))
    assert torch.autograd.gradcheck(lambda a: l2_normalize(a, eps=1e-6), (x,))


def _rms_norm_with(x, weight, gate):
    norm = RMSNorm(x.shape[-1]).to(x.dtype)
    del norm.weight
    norm.weight = weight  # a plain tensor: gradcheck differentiates the weight too
    return norm(x, gate)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norms_without_autograd_are_one_cpp_call_equal_to_the_tensor_ops(dtype, monkeypatch):
    """Decoding's norms on the cpu backend (seqmix/kernels/row_norm_cpu.cpp): chosen without autograd on CPU
    tensors, equal to the tensor ops (SEQMIX_BACKEND=reference) on a strided x; opcheck of the custom op."""
    from seqmix.kernels import step_cpu
    from seqmix.kernels.backend import recording

    row_norm = step_cpu.row_norm
    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, 6, generator=g, dtype=dtype).transpose(-1, -2)[:, :, ::2]  # [2, 5, 3, 16], strided
    gate = torch.randn(x.shape, generator=g, dtype=dtype)
    norm = RMSNorm(16, eps=1e-3).to(dtype)
    norm.weight.data = torch.randn(16, generator=g, dtype=dtype)
    calls = [lambda: norm(x, gate), lambda: norm(x), lambda: l2_normalize(x, eps=1e-6)]
    cpp_calls = []
    monkeypatch.setattr(step_cpu, "row_norm", lambda *a: cpp_calls.append(a[-1]) or row_norm(*a))
    with torch.no_grad(), recording() as choices:
        got = [f() for f in calls]
    assert cpp_calls == [True, True, False] and not choices  # one C++ call each; not a recorded choice
    monkeypatch.setenv("SEQMIX_BACKEND", "reference")
    with torch.no_grad():
        want = [f() for f in calls]
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    for name, a, b in zip(("gated rms_norm", "rms_norm", "l2_normalize"), got, want, strict=True):
        assert a.dtype == dtype and a.shape == b.shape
        assert_rel(a, b, tol, name)
    with torch.no_grad():  # a gate that broadcasts keeps the tensor ops
        assert_rel(norm(x, gate[..., :1]), _rms_norm_formula(x, norm.weight, gate[..., :1], 1e-3), tol, "broadcast gate")
    torch.library.opcheck(row_norm.op, (x, norm.weight.detach(), gate, 1e-3, True),
                          test_utils=("test_schema", "test_faketensor"))
