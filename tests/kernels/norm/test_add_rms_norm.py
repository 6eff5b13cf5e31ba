"""add_rms_norm: the reference against the formula by hand, the Triton kernels and the C++ CPU path against the
reference (outputs and gradients from either output or both), the automatic choice, and bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.kernels import add_rms_norm, explain
from seqmix.kernels import backend as backend_module
from seqmix.kernels import cpu as cpu_build
from tests.helpers import DEVICE, KERNEL_DTYPES, TOL, assert_rel, require_cpu_kernels


def _by_hand(x, residual, weight, eps):
    h = x + residual
    out = torch.empty_like(h)
    for i in range(h.shape[0]):
        row = h[i]
        out[i] = row / torch.sqrt((row * row).sum() / row.numel() + eps) * weight
    return out, h


def _inputs(M, D, dtype, seed, residual=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=g, dtype=torch.float64) * 2
    r = torch.randn(M, D, generator=g, dtype=torch.float64) if residual else None
    w = torch.rand(D, generator=g, dtype=torch.float64) + 0.5
    return [None if t is None else t.to(DEVICE, dtype) for t in (x, r, w)]


def test_reference_matches_the_formula():
    x, r, w = _inputs(5, 7, torch.float64, 0)
    normed, h = add_rms_norm(x, r, w, 1e-6, backend="reference")
    want_normed, want_h = _by_hand(x, r, w, 1e-6)
    assert_rel(normed, want_normed, 1e-12, "normed")
    assert_rel(h, want_h, 1e-12, "new residual")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
# D >= 2: for D = 1 the norm is sign(x) * w and its gradient in x is ~eps / |x|, a difference of two O(1)
# terms that cancel to below float32's resolution (ill-conditioned in any float32 implementation).
@given(rows=st.integers(1, 37), D=st.integers(2, 80), lead=st.sampled_from([(), (2,)]), residual=st.booleans(),
       use=st.sampled_from(["normed", "residual", "both"]), seed=st.integers(0, 2**31 - 1))
def test_triton_matches_reference(dtype, rows, D, lead, residual, use, seed):
    """Triton in ``dtype`` against the reference in float64 on the same (rounded) inputs."""
    _check_against_reference("triton", dtype, DEVICE, TOL[dtype], rows, D, lead, residual, use, seed)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 37), D=st.integers(2, 80), lead=st.sampled_from([(), (2,)]), residual=st.booleans(),
       use=st.sampled_from(["normed", "residual", "both"]), seed=st.integers(0, 2**31 - 1))
def test_cpu_matches_reference(rows, D, lead, residual, use, seed):
    """The C++ path in float64 against the reference in float64 (the same arithmetic up to rounding)."""
    require_cpu_kernels()
    _check_against_reference("cpu", torch.float64, torch.device("cpu"), 1e-12, rows, D, lead, residual, use, seed)


def _check_against_reference(backend, dtype, device, tol, rows, D, lead, residual, use, seed):
    """``backend`` in ``dtype`` against the reference in float64 on the same (rounded) inputs, outputs and the
    gradients of x, residual and weight through the outputs that ``use`` names."""
    x, r, w = (None if t is None else t.to(device) for t in _inputs(rows * (2 if lead else 1), D, dtype, seed,
                                                                     residual))
    x, r = (None if t is None else t.view(*lead, -1, D) if lead else t for t in (x, r))
    g = torch.Generator().manual_seed(seed + 1)
    dn, dh = (torch.randn(*x.shape, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    results = {}
    for name, cast in ((backend, dtype), ("reference", torch.float64)):
        leaves = [None if t is None else t.detach().to(cast).requires_grad_() for t in (x, r, w)]
        normed, h = add_rms_norm(*leaves, 1e-5, backend=name)
        loss = 0
        if use in ("normed", "both"):
            loss = loss + (normed * dn.to(cast)).sum()
        if use in ("residual", "both") and residual:
            loss = loss + (h * dh.to(cast)).sum()
        if not torch.is_tensor(loss):  # the residual alone, with none given: h is x
            loss = (h * dh.to(cast)).sum()
        loss.backward()
        results[name] = (normed, h, *[t.grad for t in leaves if t is not None])
    names = ["normed", "new residual", "dx", *(["dresidual"] if residual else []), "dweight"]
    for name, a, b in zip(names, results[backend], results["reference"], strict=True):
        if a is None and b is None:
            continue
        if b is None:  # only h used: the reference's weight gets no gradient, the kernel's zeros must agree
            b = torch.zeros_like(a)
        assert a.dtype == (dtype if name != "dweight" else w.dtype), f"{name} dtype {a.dtype}"
        assert_rel(a, b, tol, f"{name} (use={use})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_without_autograd_is_one_call_that_equals_the_reference(dtype):
    """Without autograd (decoding) the C++ path is the row norm's one call: outputs in x's dtype, computed in
    float32 (bfloat16 inputs rounded once, as the reference rounds them)."""
    require_cpu_kernels()
    x, r, w = (t.cpu() for t in _inputs(3, 24, torch.float64, 9))
    x, r = x.to(dtype).view(3, 1, 24), r.to(dtype).view(3, 1, 24)
    with torch.no_grad():
        normed, h = add_rms_norm(x, r, w, 1e-5, backend="cpu")
        want_normed, want_h = add_rms_norm(x, r, w, 1e-5, backend="reference")
    assert normed.dtype == h.dtype == dtype
    assert torch.equal(h, want_h)
    assert_rel(normed, want_normed, 1e-6 if dtype == torch.float32 else TOL[dtype], "normed")


def test_automatic_choice_on_the_cpu(monkeypatch):
    """Triton where it runs (here: the interpreter), else the C++ kernels once compiled, else the reference."""
    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    x, r, w = torch.randn(2, 8), torch.randn(2, 8), torch.ones(8)
    monkeypatch.setattr(backend_module, "triton_interpreting", lambda: True)
    assert explain(add_rms_norm, x, r, w).backend == "triton"
    monkeypatch.setattr(backend_module, "triton_interpreting", lambda: False)
    assert explain(add_rms_norm, x, r, w).backend == "cpu"
    monkeypatch.setattr(cpu_build, "ready", lambda: False)
    assert explain(add_rms_norm, x, r, w).backend == "reference"
    assert explain(add_rms_norm, x, r, w, backend="cpu").backend == "cpu"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"x": torch.randn(3, 0)}, r"x must be a tensor of shape \[\.\.\., D\] with D >= 1"),
        ({"x": torch.tensor(1.0)}, r"x must be a tensor of shape"),
        ({"x": torch.ones(3, 4, dtype=torch.int64)}, "x must be a floating tensor"),
        ({"residual": torch.randn(3, 5)}, r"residual must have shape"),
        ({"residual": torch.randn(3, 4, dtype=torch.float64)}, "x, residual must share one dtype"),
        ({"weight": torch.randn(5)}, r"weight must have shape \[D\]"),
        ({"eps": 0.0}, "eps must be a positive finite number"),
        ({"eps": float("nan")}, "eps must be a positive finite number"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"x": torch.randn(3, 4), "residual": torch.randn(3, 4), "weight": torch.randn(4), "eps": 1e-5, **kwargs}
    with pytest.raises(ValueError, match=match):
        add_rms_norm(args["x"], args["residual"], args["weight"], args["eps"])


def test_no_rows():
    x = torch.randn(0, 4, device=DEVICE)
    normed, h = add_rms_norm(x, torch.randn(0, 4, device=DEVICE), torch.ones(4, device=DEVICE), backend="triton")
    assert normed.shape == h.shape == (0, 4)
