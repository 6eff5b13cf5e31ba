"""RMSNorm, gated or not (seqmix/kernels/norm, rms_norm): the C++ CPU kernels against the tensor ops in float64
(output and the gradients of x, weight and gate), float32 against float64, rows whose width is not a multiple
of a vector, the automatic choice, bad input, the custom ops under opcheck and torch.compile, and the layers'
RMSNorm on it."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.archs.modules import RMSNorm
from seqmix.kernels import cpu as cpu_build
from seqmix.kernels import explain, rms_norm
from seqmix.kernels.backend import recording
from tests.helpers import TOL, assert_rel, require_cpu_kernels


@pytest.fixture(autouse=True)
def kernels_built():
    require_cpu_kernels()


def _inputs(shape, dtype, seed, gated):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    weight = (1 + torch.randn(shape[-1], generator=g, dtype=torch.float64) / 2).to(dtype).requires_grad_()
    # Gates wide enough that silu's both tails matter (sigmoid ~0 and ~1).
    gate = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype).requires_grad_() if gated else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, weight, gate, dy


def _run(x, weight, gate, dy, backend, eps=1e-5):
    y = rms_norm(x, weight, gate, eps, backend=backend)
    return (y, *torch.autograd.grad(y, [t for t in (x, weight, gate) if t is not None], dy))


NAMES = ("y", "dx", "dweight", "dgate")


# Rows of at least 4 values: dx is a's part orthogonal to xhat, which for one or two values is a cancellation of
# nearly equal terms (D = 1: a (1 - xhat^2) with xhat^2 = x^2 / (x^2 + eps)), computed to 1e-10 by either path.
@settings(max_examples=20, deadline=None)
@given(rows=st.lists(st.integers(1, 9), max_size=2), D=st.integers(4, 41), gated=st.booleans(),
       seed=st.integers(0, 2**16))
def test_float64_matches_the_tensor_ops(rows, D, gated, seed):
    inputs = _inputs([*rows, D], torch.float64, seed, gated)
    for name, a, b in zip(NAMES, _run(*inputs, "cpu"), _run(*inputs, "reference"), strict=False):
        assert_rel(a, b, 1e-13, name)


@pytest.mark.parametrize("gated", [False, True])
def test_float32_matches_float64(gated):
    x, weight, gate, dy = _inputs((4, 50, 96), torch.float32, 1, gated)
    exact = _run(*(None if t is None else t.detach().double().requires_grad_(t.requires_grad)
                   for t in (x, weight, gate, dy)), "reference")
    for name, a, b in zip(NAMES, _run(x, weight, gate, dy, "cpu"), exact, strict=False):
        assert a.dtype == torch.float32
        assert_rel(a, b, TOL[torch.float32], name)


@pytest.mark.parametrize("gated", [False, True])
def test_without_autograd_equals_the_tensor_ops(gated):
    """Without autograd the op is the row norm's one call (seqmix/kernels/step_cpu.py)."""
    x, weight, gate, _ = _inputs((3, 2, 40), torch.float64, 8, gated)
    with torch.no_grad():
        assert_rel(rms_norm(x, weight, gate, backend="cpu"), rms_norm(x, weight, gate, backend="reference"), 1e-13, "y")


def test_many_rows_sum_dweight_over_tasks():
    """More rows than one task holds (2^15 values), so dweight is a sum of task partials, and a short row where
    eps matters."""
    x, weight, gate, dy = _inputs((3, 700, 64), torch.float64, 5, True)
    x.data[0, 0] *= 1e-4
    for name, a, b in zip(NAMES, _run(x, weight, gate, dy, "cpu", 1e-3), _run(x, weight, gate, dy, "reference", 1e-3),
                          strict=True):
        assert_rel(a, b, 1e-13, name)


def test_bfloat16_computes_in_float32_and_gradcheck():
    x, weight, gate, _ = _inputs((2, 3, 8), torch.bfloat16, 2, True)
    y = rms_norm(x, weight, gate, backend="cpu")
    assert y.dtype == torch.bfloat16
    assert_rel(y, rms_norm(x, weight, gate, backend="reference"), TOL[torch.bfloat16], "bf16 y")
    x, weight, gate, _ = _inputs((2, 3, 8), torch.float64, 3, True)
    assert torch.autograd.gradcheck(lambda a, w, b: rms_norm(a, w, b, backend="cpu"), (x, weight, gate))


def test_automatic_choice_takes_the_kernels_only_once_built(monkeypatch):
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    x, weight, gate = torch.randn(2, 8), torch.ones(8), torch.randn(2, 8)
    assert explain(rms_norm, x, weight, gate).backend == "cpu"
    assert explain(rms_norm, x, weight, gate[:, :1]).backend == "reference"  # a gate that broadcasts
    monkeypatch.setattr(cpu_build, "ready", lambda: False)
    assert explain(rms_norm, x, weight).backend == "reference"
    assert explain(rms_norm, x, weight, backend="cpu").backend == "cpu"


def test_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \[D\]"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="x must be a tensor of shape"):
        rms_norm(torch.tensor(1.0), torch.ones(1))
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        rms_norm(torch.ones(2, 8, dtype=torch.int32), torch.ones(8))
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        rms_norm(x, torch.ones(8), eps=0.0)
    with pytest.raises(ValueError, match="gate must be a floating tensor"):
        rms_norm(x, torch.ones(8), torch.ones(2, 8, dtype=torch.int32))


def test_custom_ops_pass_opcheck():
    x, weight, gate, dy = (None if t is None else t.detach() for t in _inputs((3, 40), torch.float32, 4, True))
    ops = torch.ops.seqmix
    for g in (gate, None):
        torch.library.opcheck(ops.rms_norm_cpu_fwd.default, (x, weight, g, 1e-5))
        rstd = ops.rms_norm_cpu_fwd.default(x, weight, g, 1e-5)[1]
        torch.library.opcheck(ops.rms_norm_cpu_bwd.default, (x, weight, g, rstd, dy))


def test_compiled_call_equals_eager():
    x, weight, gate, dy = _inputs((2, 9, 24), torch.float32, 6, True)

    def loss(x, weight, gate):
        return (rms_norm(x, weight, gate, backend="cpu") * dy).sum()

    eager = torch.autograd.grad(loss(x, weight, gate), (x, weight, gate))
    compiled_loss = torch.compile(loss, fullgraph=True, backend="aot_eager_decomp_partition")
    compiled = torch.autograd.grad(compiled_loss(x, weight, gate), (x, weight, gate))
    for name, a, b in zip(NAMES[1:], compiled, eager, strict=True):
        assert_rel(a, b, 1e-6, f"compiled {name}")


def test_the_layers_norm_on_the_kernels_equals_the_tensor_ops(monkeypatch):
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    norm = RMSNorm(24, eps=1e-3).double()
    x, weight, gate, dy = _inputs((2, 5, 24), torch.float64, 7, True)
    norm.weight.data = weight.detach().clone()
    with recording() as choices:
        fused = norm(x, gate)
    grads = torch.autograd.grad(fused, (x, gate, norm.weight), dy)
    monkeypatch.setenv("SEQMIX_BACKEND", "reference")
    with recording() as plain_choices:
        plain = norm(x, gate)
    assert [c.backend for c in choices] == ["cpu"] and [c.backend for c in plain_choices] == ["reference"]
    assert_rel(fused, plain, 1e-13, "out")
    for a, b in zip(grads, torch.autograd.grad(plain, (x, gate, norm.weight), dy), strict=True):
        assert_rel(a, b, 1e-13, "grad")
