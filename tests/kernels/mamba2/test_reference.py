"""The chunked SSD form against the step-by-step recurrence, in float64 on the CPU."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.kernels.gated_linear_attention.reference import factored_limit
from seqmix.kernels.mamba2 import reference, ssd_chunked, ssd_recurrent
from tests.helpers import TOL, assert_rel
from tests.kernels.mamba2.cases import Case, cases, make_inputs


@settings(max_examples=6)
@given(case=cases(max_t=100), chunk_size=st.sampled_from([1, 16, 64]))
def test_chunked_form_matches_recurrence(case, chunk_size):
    inputs = make_inputs(case, torch.float64, "cpu")
    kw = case.kwargs(inputs)
    y_ref, s_ref = ssd_recurrent(*inputs[:5], **kw, output_final_state=True)
    y, s = ssd_chunked(*inputs[:5], **kw, output_final_state=True, chunk_size=chunk_size)
    assert_rel(y, y_ref, 1e-12, "output")
    assert_rel(s, s_ref, 1e-12, "final state")


@settings(max_examples=5)
@given(case=cases(max_t=50, head_dims=(3, 4), state_dims=(5,)))
def test_chunked_form_gradients_match_recurrence(case):
    inputs = make_inputs(case, torch.float64, "cpu", requires_grad=True)
    inputs = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    kw = case.kwargs(inputs)
    wrt = [t for t in inputs if t is not None]
    grads = []
    for fn in (ssd_recurrent, ssd_chunked):
        y, s = fn(*inputs[:5], **kw, output_final_state=True)
        g = torch.Generator().manual_seed(case.seed + 1)
        loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
        grads.append(torch.autograd.grad(loss, wrt))
    for i, (a, b) in enumerate(zip(grads[1], grads[0], strict=True)):
        assert_rel(a, b, 1e-11, f"gradient of input {i}")


def test_recurrence_is_the_contract():
    """One step by hand: h1 = exp(dt' a) h0 + dt' x B^T, y = (h1 C + D x) silu(z), dt' = softplus(dt + bias)."""
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(1, 1, 2, 3, generator=g, dtype=torch.float64), torch.randn(1, 1, 2, 3, generator=g,
                                                                                   dtype=torch.float64)
    dt, A = torch.randn(1, 1, 2, generator=g, dtype=torch.float64), -torch.rand(2, generator=g, dtype=torch.float64)
    B, C = torch.randn(1, 1, 1, 4, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 4, generator=g,
                                                                                   dtype=torch.float64)
    D, bias = torch.randn(2, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    h0 = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64)
    y, h1 = ssd_recurrent(x, dt, A, B, C, D, z, bias, True, (0.0, math.inf), h0, True)
    for h in range(2):
        d = F.softplus(dt[0, 0, h] + bias[h])
        H1 = torch.exp(d * A[h]) * h0[0, h] + d * torch.outer(x[0, 0, h], B[0, 0, 0])
        torch.testing.assert_close(h1[0, h], H1)
        torch.testing.assert_close(y[0, 0, h], (H1 @ C[0, 0, 0] + D[h] * x[0, 0, h]) * F.silu(z[0, 0, h]))


def test_dt_limit_clamps():
    case = Case(batch=1, lengths=None, seqlen=20, heads=2, groups=1, p=3, n=4, initial_state=False, extras=False,
                seed=3)
    inputs = make_inputs(case, torch.float64, "cpu")
    y, s = ssd_recurrent(*inputs[:5], dt_limit=(0.2, 0.3), output_final_state=True)
    y_ref, s_ref = ssd_recurrent(inputs[0], inputs[1].clamp(0.2, 0.3), *inputs[2:5], output_final_state=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref)


def test_strong_decay_stays_finite_in_float32():
    """dt' A around -20 per step: exp(dt' A) underflows; the chunked form never forms exp(+L)."""
    case = Case(batch=1, lengths=None, seqlen=200, heads=2, groups=1, p=4, n=8, initial_state=True, extras=False,
                seed=4, log_decay=40.0)
    inputs = make_inputs(case, torch.float32, "cpu")
    y, s = ssd_chunked(*inputs[:5], initial_state=inputs[8], output_final_state=True)
    y64, s64 = ssd_recurrent(*[t.double() for t in inputs[:5]], initial_state=inputs[8].double(),
                             output_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert_rel(y, y64, 1e-5, "output")
    assert_rel(s, s64, 1e-5, "final state")


def _grads(fn, inputs, seed, **options):
    """Output, final state and the gradients of every input (A, D, z, dt_bias and the initial state
    included) for one random loss of both results."""
    kw = {**options}
    y, s = fn(*inputs[:5], D=inputs[5], z=inputs[6], dt_bias=inputs[7], dt_softplus=inputs[6] is not None,
              initial_state=inputs[8], output_final_state=True, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64)).sum()
    loss = loss + (s.double() * torch.randn(s.shape, generator=g, dtype=torch.float64)).sum()
    return y, s, torch.autograd.grad(loss, [t for t in inputs if t is not None])


@pytest.mark.parametrize("case", [
    # ragged (100 = 64 + 36), two groups of two heads, every optional input
    Case(batch=2, lengths=None, seqlen=100, heads=4, groups=2, p=3, n=5, initial_state=True, extras=True, seed=1),
    # packed with an empty and a one-token sequence, one group
    Case(batch=1, lengths=(70, 0, 1, 30), seqlen=101, heads=2, groups=1, p=4, n=6, initial_state=True,
         extras=False, seed=2),
])
def test_chunked_backward_matches_recurrence_for_every_input(case):
    """The hand-written backward of the chunked form (docs/math/mamba2.md, "The CPU reference") against the
    float64 recurrence: gradients of x, dt, A, B, C, D, z, dt_bias and the initial state."""
    inputs = [None if t is None else t.detach().double().requires_grad_()
              for t in make_inputs(case, torch.float64, "cpu")]
    cu = case.cu_seqlens("cpu")
    y, s, grads = _grads(ssd_chunked, inputs, case.seed, cu_seqlens=cu)
    y_ref, s_ref, ref_grads = _grads(ssd_recurrent, inputs, case.seed, cu_seqlens=cu)
    assert_rel(y, y_ref, 1e-12, "output")
    assert_rel(s, s_ref, 1e-12, "final state")
    names = [n for n, t in zip(("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "h0"), inputs) if t is not None]
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert_rel(a, b, 1e-11, f"d{name}")


def test_strong_decay_gradients_stay_finite_in_float32():
    """dt' A around -20 per step in float32: every gradient finite and equal to the float64 recurrence's."""
    case = Case(batch=1, lengths=None, seqlen=90, heads=2, groups=1, p=4, n=8, initial_state=True, extras=False,
                seed=4, log_decay=40.0)
    inputs = make_inputs(case, torch.float32, "cpu", requires_grad=True)
    _, _, grads = _grads(ssd_chunked, inputs, 3)
    up = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    _, _, ref_grads = _grads(ssd_recurrent, up, 3)
    for name, a, b in zip(("x", "dt", "A", "B", "C", "h0"), grads, ref_grads, strict=True):
        assert torch.isfinite(a).all(), f"d{name} is not finite"
        assert_rel(a, b, TOL[torch.float32], f"d{name}")


@pytest.mark.parametrize("form", ["_SSDFactored", "_SSDChunks"])
def test_both_chunked_forms_match_recurrence_for_every_input(form, monkeypatch):
    """Each of the two chunked forms (docs/math/mamba2.md), forced, against the float64 recurrence: two groups,
    ragged, gradients of x, dt, A, B, C, D, z, dt_bias and the initial state."""
    monkeypatch.setattr(reference, "_chunks_function", lambda dt, A, c: getattr(reference, form))
    case = Case(batch=2, lengths=None, seqlen=100, heads=4, groups=2, p=3, n=5, initial_state=True, extras=True,
                seed=5)
    inputs = [None if t is None else t.detach().double().requires_grad_()
              for t in make_inputs(case, torch.float64, "cpu")]
    y, s, grads = _grads(ssd_chunked, inputs, case.seed, chunk_size=32)
    y_ref, s_ref, ref_grads = _grads(ssd_recurrent, inputs, case.seed)
    assert_rel(y, y_ref, 1e-12, "output")
    assert_rel(s, s_ref, 1e-12, "final state")
    names = [n for n, t in zip(("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "h0"), inputs) if t is not None]
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert_rel(a, b, 1e-11, f"d{name}")


def test_factored_form_up_to_its_limit_in_float32():
    """Chunk totals of the log decay up to 0.95 factored_limit (exp(-lcum) near e^42) in float32: the factored
    form serves and every gradient equals the float64 recurrence's."""
    case = Case(batch=1, lengths=None, seqlen=128, heads=2, groups=1, p=4, n=8, initial_state=True, extras=False,
                seed=6)
    inputs = make_inputs(case, torch.float32, "cpu")
    totals = (inputs[1].view(1, 2, 64, 2) * inputs[2]).sum(2)  # [1, chunks, heads]
    inputs[2] = inputs[2] * (0.95 * factored_limit(torch.float32) / -totals.min())
    assert reference._chunks_function(inputs[1], inputs[2], 64) is reference._SSDFactored
    inputs = [None if t is None else t.requires_grad_() for t in inputs]
    y, s, grads = _grads(ssd_chunked, inputs, 7)
    up = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    y64, s64, ref_grads = _grads(ssd_recurrent, up, 7)
    assert_rel(y, y64, TOL[torch.float32], "output")
    assert_rel(s, s64, TOL[torch.float32], "final state")
    for name, a, b in zip(("x", "dt", "A", "B", "C", "h0"), grads, ref_grads, strict=True):
        assert_rel(a, b, TOL[torch.float32], f"d{name}")
