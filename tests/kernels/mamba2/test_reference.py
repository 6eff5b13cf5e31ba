"""The chunked SSD form against the step-by-step recurrence, in float64 on the CPU."""

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.kernels.mamba2 import ssd_chunked, ssd_recurrent
from tests.helpers import assert_rel
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
