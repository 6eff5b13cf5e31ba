"""The SwiGLU activation (seqmix/kernels/mlp.py): the C++ CPU kernels against the tensor ops in float64 (output
and both gradients), float32 against float64 (and value by value at the tails and special values), shapes whose
size is not a multiple of a vector, the automatic choice, bad input, the custom ops under opcheck and
torch.compile, and the LM's MLP on it."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.archs.lm import SwiGLU
from seqmix.kernels import BackendUnavailable, explain, swiglu
from seqmix.kernels import cpu as cpu_build
from seqmix.kernels.backend import recording
from seqmix.kernels.mlp import swiglu_reference
from tests.helpers import TOL, assert_rel, require_cpu_kernels


@pytest.fixture(autouse=True)
def kernels_built():
    require_cpu_kernels()


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # Gates wide enough that silu's both tails matter (sigmoid ~0 and ~1).
    gate = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype).requires_grad_()
    up = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    dh = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return gate, up, dh


def _run(gate, up, dh, backend):
    h = swiglu(gate, up, backend=backend) if backend else swiglu_reference(gate, up)
    return (h, *torch.autograd.grad(h, (gate, up), dh))


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 37), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_float64_matches_the_tensor_ops(shape, seed):
    gate, up, dh = _inputs(shape, torch.float64, seed)
    for name, a, b in zip(("h", "dgate", "dup"), _run(gate, up, dh, "cpu"), _run(gate, up, dh, None), strict=True):
        assert_rel(a, b, 1e-13, name)


def test_float32_matches_float64():
    gate, up, dh = _inputs((4, 50, 96), torch.float32, 1)
    exact = _run(*(t.detach().double().requires_grad_(t.requires_grad) for t in (gate, up, dh)), None)
    for name, a, b in zip(("h", "dgate", "dup"), _run(gate, up, dh, "cpu"), exact, strict=True):
        assert a.dtype == torch.float32
        assert_rel(a, b, TOL[torch.float32], name)


def test_float32_tails_and_special_values_value_by_value():
    """silu(gate) and its gradient value by value where the vector exp and sigmoid (vec_cpu.h) reach their ends:
    past exp's finite range, around float32's smallest normal, infinities and NaN, and a sweep of [-120, 120].
    The norm-wise comparisons above would not see a wrong tail."""
    special = torch.tensor([-math.inf, -1e30, -1000.0, -104.0, -88.8, -87.4, -20.0, -1e-30, -0.0, 0.0, 1e-30, 20.0,
                            88.5, 100.0, 1e30, math.inf, math.nan])
    gate = torch.cat([special, torch.linspace(-120, 120, 24001)]).requires_grad_()
    up = torch.ones_like(gate, requires_grad=True)
    h, dgate, _ = _run(gate, up, torch.ones_like(gate), "cpu")
    g = gate.detach().double().requires_grad_()
    exact_h = torch.nn.functional.silu(g)
    (exact_dgate,) = torch.autograd.grad(exact_h.sum(), g)
    g, exact_h = g.detach(), exact_h.detach()
    # The scale of what each value sums: silu'(g) = s + g s (1 - s) cancels near g = -1.28, so its error is
    # relative to the terms'.
    scales = {"h": exact_h.abs(), "dgate": exact_dgate.abs() + torch.sigmoid(g) * (1 + g.abs())}
    for name, got, want in (("h", h, exact_h), ("dgate", dgate, exact_dgate)):
        finite = want.isfinite() & g.isfinite()
        assert torch.equal(got[~finite].isnan(), want[~finite].isnan()), name
        assert torch.equal(got[~finite].nan_to_num(), want[~finite].float().nan_to_num()), name
        # A few float32 roundings of the terms; values below 1e-36 (the tail past exp's finite range, about
        # float32's smallest normal) may be 0.
        err = (got[finite].double() - want[finite]).abs()
        assert (err <= 4e-7 * scales[name][finite] + 1e-36).all(), f"{name}: worst {err.max().item():.3g}"


def test_automatic_choice_takes_the_kernels_only_once_built(monkeypatch):
    gate, up = torch.randn(2, 8), torch.randn(2, 8)
    assert explain(swiglu, gate, up).backend == "cpu"
    assert explain(swiglu, gate.bfloat16(), up.bfloat16()).backend == "reference"
    monkeypatch.setattr(cpu_build, "ready", lambda: False)
    assert explain(swiglu, gate, up).backend == "reference"
    assert explain(swiglu, gate, up, backend="cpu").backend == "cpu"


def test_bad_input():
    with pytest.raises(ValueError, match=r"up must have shape \[..., I\] \(gate's shape\)"):
        swiglu(torch.randn(2, 8), torch.randn(2, 7))
    with pytest.raises(ValueError, match="gate, up must share one dtype"):
        swiglu(torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="gate must be a floating tensor"):
        swiglu(torch.ones(2, 8, dtype=torch.int32), torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="gate must be a tensor of shape"):
        swiglu(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(BackendUnavailable, match="'cpu' cannot serve this call: gate and up must be float32"):
        swiglu(torch.randn(2, 8).half(), torch.randn(2, 8).half(), backend="cpu")


def test_custom_ops_pass_opcheck():
    gate, up, dh = _inputs((3, 40), torch.float32, 2)
    ops = torch.ops.seqmix
    torch.library.opcheck(ops.swiglu_cpu_fwd.default, (gate, up))
    torch.library.opcheck(ops.swiglu_cpu_bwd.default, (gate.detach(), up.detach(), dh))


def test_compiled_call_equals_eager():
    gate, up, dh = _inputs((2, 9, 24), torch.float32, 3)

    def loss(gate, up):
        return (swiglu(gate, up) * dh).sum()

    eager = torch.autograd.grad(loss(gate, up), (gate, up))
    compiled_loss = torch.compile(loss, fullgraph=True, backend="aot_eager_decomp_partition")
    compiled = torch.autograd.grad(compiled_loss(gate, up), (gate, up))
    for name, a, b in zip(("dgate", "dup"), compiled, eager, strict=True):
        assert_rel(a, b, 1e-6, f"compiled {name}")


def test_the_mlp_on_the_kernels_equals_the_tensor_ops(monkeypatch):
    torch.manual_seed(4)
    mlp = SwiGLU(16, 40).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    with recording() as choices:
        fused = mlp(x)
    grads = torch.autograd.grad(fused.square().sum(), (x, *mlp.parameters()))
    monkeypatch.setenv("SEQMIX_BACKEND", "reference")
    with recording() as plain_choices:
        plain = mlp(x)
    assert [c.backend for c in choices] == ["cpu"] and [c.backend for c in plain_choices] == ["reference"]
    plain_grads = torch.autograd.grad(plain.square().sum(), (x, *mlp.parameters()))
    assert_rel(fused, plain, 1e-13, "out")
    for a, b in zip(grads, plain_grads, strict=True):
        assert_rel(a, b, 1e-13, "grad")
