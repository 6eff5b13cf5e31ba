"""The chunked WY form against the step-by-step recurrence, in float64 on the CPU."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seqmix.kernels.deltanet import delta_rule_chunked, delta_rule_recurrent
from tests.helpers import assert_rel
from tests.kernels.deltanet.cases import cases, make_inputs


@given(case=cases(max_t=150, head_dims=(3, 8, 16)), chunk_size=st.sampled_from([1, 16, 64]))
def test_chunked_form_matches_recurrence(case, chunk_size):
    q, k, v, beta, h0 = make_inputs(case, torch.float64, "cpu")
    cu = case.cu_seqlens("cpu")
    o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, 0.7, h0, True, cu)
    o, s = delta_rule_chunked(q, k, v, beta, 0.7, h0, True, cu, chunk_size=chunk_size)
    assert_rel(o, o_ref, 1e-12, "output")
    assert_rel(s, s_ref, 1e-12, "final state")


@pytest.mark.slow
@given(case=cases(max_t=70, head_dims=(4, 8)))
def test_chunked_form_gradients_match_recurrence(case):
    q, k, v, beta, h0 = make_inputs(case, torch.float64, "cpu", requires_grad=True)
    cu = case.cu_seqlens("cpu")
    inputs = [t for t in (q, k, v, beta, h0) if t is not None]
    grads = []
    for fn in (delta_rule_recurrent, delta_rule_chunked):
        o, s = fn(q, k, v, beta, 0.5, h0, True, cu)
        g = torch.Generator().manual_seed(case.seed + 1)
        loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum()
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
        grads.append(torch.autograd.grad(loss, inputs))
    for name, a, b in zip(["q", "k", "v", "beta", "h0"][: len(inputs)], grads[1], grads[0], strict=True):
        assert_rel(a, b, 1e-11, f"d{name}")


def test_recurrence_is_the_contract():
    """One step by hand: S1 = S0 + beta k (v - S0^T k)^T, o = scale S1^T q."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 3, dtype=torch.float64), torch.randn(1, 1, 1, 3, dtype=torch.float64)
    v, beta = torch.randn(1, 1, 1, 2, dtype=torch.float64), torch.rand(1, 1, 1, dtype=torch.float64)
    s0 = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    o, s1 = delta_rule_recurrent(q, k, v, beta, 0.3, s0, True)
    kk, vv, S = k[0, 0, 0], v[0, 0, 0], s0[0, 0]
    S1 = S + beta[0, 0, 0] * torch.outer(kk, vv - S.T @ kk)
    torch.testing.assert_close(s1[0, 0], S1)
    torch.testing.assert_close(o[0, 0, 0], 0.3 * S1.T @ q[0, 0, 0])
