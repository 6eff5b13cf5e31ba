"""The gated delta rule: the chunked reference against the recurrence (float64), the fused Triton
kernels against the float64 reference (outputs, final states, gradients of every input including g
and the initial state), extreme decays, decoding, and bad input.

Without a GPU the kernels run in Triton's interpreter (float32, small shapes); with one, the same
tests run compiled, and the anchor shapes are checked in bfloat16.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.kernels import gated_delta_rule
from seqmix.kernels.deltanet import gated_delta_rule_chunked, gated_delta_rule_recurrent
from tests.helpers import DEVICE, KERNEL_DTYPES, ON_GPU, TOL, assert_rel
from tests.kernels.contract import (
    assert_grads,
    check_chunked_gradients_match_recurrence,
    check_chunked_matches_recurrence,
    outputs_and_grads,
)
from tests.kernels.deltanet.cases import Case, cases, make_gated_inputs

NAMES = ["q", "k", "v", "g", "beta", "initial_state"]


def _compare(case, dtype, g=None, scale=None, dg_scale=False):
    """The Triton op against the float64 chunked reference on the same inputs."""
    inputs = make_gated_inputs(case, dtype, DEVICE, requires_grad=True, g=g)
    scale = case.k**-0.5 if scale is None else scale
    cu = case.cu_seqlens(DEVICE)

    def fused(q, k, v, g, beta, h0):
        return gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True,
                                cu_seqlens=cu, backend="triton")

    def reference(q, k, v, g, beta, h0):
        return gated_delta_rule_chunked(q, k, v, g, beta, scale, h0, True, cu)

    o, s, grads = outputs_and_grads(fused, inputs, case.seed + 1)
    up = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    o_ref, s_ref, ref_grads = outputs_and_grads(reference, up, case.seed + 1)
    tol = TOL[dtype]
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_rel(o, o_ref, tol, "output")
    assert_rel(s, s_ref, tol, "final state")
    assert_grads([n for n, t in zip(NAMES, inputs) if t is not None], grads, ref_grads, tol, dg_scale)


@settings(max_examples=10)
@given(case=cases(max_t=150, head_dims=(3, 8, 16)), chunk_size=st.sampled_from([1, 16, 64]))
def test_chunked_form_matches_recurrence(case, chunk_size):
    q, k, v, g, beta, h0 = make_gated_inputs(case, torch.float64, "cpu")
    cu = case.cu_seqlens("cpu")
    check_chunked_matches_recurrence(gated_delta_rule_recurrent, gated_delta_rule_chunked,
                                     (q, k, v, g.double(), beta, h0),
                                     lambda fn, *x, **kw: fn(*x[:5], 0.7, x[5], True, cu, **kw), chunk_size)


@settings(max_examples=8)
@given(case=cases(max_t=70, head_dims=(4, 8)))
def test_chunked_form_gradients_match_recurrence(case):
    inputs = make_gated_inputs(case, torch.float64, "cpu")
    cu = case.cu_seqlens("cpu")
    check_chunked_gradients_match_recurrence(gated_delta_rule_recurrent, gated_delta_rule_chunked, inputs,
                                             lambda fn, *x: fn(*x[:5], 0.5, x[5], True, cu), NAMES, case.seed, 1e-11)


def test_recurrence_is_the_contract():
    """One step by hand: S1 = e^g S0 + beta k (v - e^g S0^T k)^T, o = scale S1^T q."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 1, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 1, 1, 2, generator=gen, dtype=torch.float64)
    beta, g = torch.rand(1, 1, 1, dtype=torch.float64), torch.tensor([[[-0.4]]], dtype=torch.float64)
    s0 = torch.randn(1, 1, 3, 2, generator=gen, dtype=torch.float64)
    o, s1 = gated_delta_rule_recurrent(q, k, v, g, beta, 0.3, s0, True)
    kk, vv, S = k[0, 0, 0], v[0, 0, 0], s0[0, 0] * torch.exp(g[0, 0, 0])
    S1 = S + beta[0, 0, 0] * torch.outer(kk, vv - S.T @ kk)
    torch.testing.assert_close(s1[0, 0], S1)
    torch.testing.assert_close(o[0, 0, 0], 0.3 * S1.T @ q[0, 0, 0])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@settings(max_examples=8)
@given(case=cases(max_t=130))
def test_triton_matches_reference(case, dtype):
    _compare(case, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_largest_head_dims(dtype):
    case = Case(batch=1, lengths=None, seqlen=70, heads=1, k=256, v=200, initial_state=True, seed=3)
    _compare(case, dtype, scale=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["all -20", "-20 and near 0"])
def test_extreme_decays_stay_finite_and_exact(pattern):
    """Per-token log decays of -20 reach -1280 inside a chunk: exp(b_i) * exp(-b_j) would overflow,
    exp(b_i - b_j) does not. Mixed with decays near 0 the state keeps memory across chunks."""
    case = Case(batch=1, lengths=(190, 130), seqlen=320, heads=2, k=16, v=16, initial_state=True, seed=21)
    shape = (1, case.seqlen, case.heads)
    gen = torch.Generator().manual_seed(5)
    if pattern == "all -20":
        g = torch.full(shape, -20.0)
    else:
        g = torch.where(torch.rand(shape, generator=gen) < 0.3, -20.0, -1e-3 * torch.rand(shape, generator=gen))
    _compare(case, torch.float32, g=g, dg_scale=True)


@pytest.mark.slow
def test_decays_of_zero_are_the_delta_rule():
    """g = 0 (no decay) gives exactly the plain delta rule's function."""
    from seqmix.kernels import delta_rule

    case = Case(batch=2, lengths=None, seqlen=90, heads=2, k=16, v=8, initial_state=True, seed=2)
    q, k, v, g, beta, h0 = make_gated_inputs(case, torch.float32, DEVICE, g=torch.zeros(2, 90, 2))
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="triton")
    o_ref, s_ref = delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, backend="triton")
    assert_rel(o, o_ref, 1e-6, "output")
    assert_rel(s, s_ref, 1e-6, "final state")


@settings(max_examples=8)
@given(case=cases(max_t=12), dtype=st.sampled_from(KERNEL_DTYPES))
def test_recurrent_decoding_matches_reference(case, dtype):
    """Without gradients and with few tokens per sequence the token-by-token kernel serves the call."""
    q, k, v, g, beta, h0 = make_gated_inputs(case, dtype, DEVICE)
    cu = case.cu_seqlens(DEVICE)
    with torch.no_grad():
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                backend="triton")
        up = [None if t is None else t.double() for t in (q, k, v, g, beta, h0)]
        o_ref, s_ref = gated_delta_rule_chunked(*up[:5], case.k**-0.5, up[5], True, cu)
    assert_rel(o, o_ref, TOL[dtype], "output")
    assert_rel(s, s_ref, TOL[dtype], "final state")


@pytest.mark.slow
def test_16k_tokens_of_strong_decay_stay_finite():
    """16K tokens in the float32 reference with decays from exp(-20) to 1: no overflow, no NaN,
    and the state stays bounded (it forgets)."""
    case = Case(batch=1, lengths=None, seqlen=16384, heads=1, k=8, v=8, initial_state=True, seed=17)
    shape = (1, case.seqlen, 1)
    gen = torch.Generator().manual_seed(1)
    g = torch.where(torch.rand(shape, generator=gen) < 0.5, -20.0, -1e-4 * torch.rand(shape, generator=gen))
    q, k, v, g, beta, h0 = make_gated_inputs(case, torch.float32, "cpu", requires_grad=True, g=g)
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="reference")
    (o.sum() + s.sum()).backward()
    for name, t in (("o", o), ("s", s), ("dg", g.grad), ("dq", q.grad), ("dh0", h0.grad)):
        assert torch.isfinite(t).all(), f"{name} is not finite"


def test_bad_inputs_name_g():
    case = Case(batch=2, lengths=None, seqlen=8, heads=2, k=4, v=4, initial_state=False, seed=0)
    q, k, v, g, beta, _ = make_gated_inputs(case, torch.float32, DEVICE)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match=r"g must have shape \[B, T, H\]"):
            gated_delta_rule(q, k, v, g[..., None].expand(2, 8, 2, 4), beta, backend=backend)
        with pytest.raises(ValueError, match=r"g must have shape \[B, T, H\] = \(2, 8, 2\)"):
            gated_delta_rule(q, k, v, g[:, :7], beta, backend=backend)
        # a check of g's values: CPU tensors (on CUDA tensors a device-side assertion, tests/kernels/test_checks.py)
        with pytest.raises(ValueError, match="g holds log decays and must be <= 0 everywhere, got a maximum of 0.5"):
            bad = g.clone().cpu().index_fill_(1, torch.tensor([3]), 0.5)
            gated_delta_rule(q.cpu(), k.cpu(), v.cpu(), bad, beta.cpu(), backend=backend)
        with pytest.raises(ValueError, match="g must be a floating tensor"):
            gated_delta_rule(q, k, v, g.long(), beta, backend=backend)
        with pytest.raises(ValueError, match="g must be a tensor of log decays"):
            gated_delta_rule(q, k, v, None, beta, backend=backend)
        with pytest.raises(ValueError, match=r"v must have shape \[B, T, H, V\]"):
            gated_delta_rule(q, k, v[:, :5], g, beta, backend=backend)
        with pytest.raises(ValueError, match="cu_seqlens must end at the packed length T=16"):
            flat = [t.reshape(1, 16, *t.shape[2:]) for t in (q, k, v, g, beta)]
            gated_delta_rule(*flat, cu_seqlens=torch.tensor([0, 5, 15], device=DEVICE), backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("batch, seqlen", [(2, 0), (0, 5)])
def test_no_tokens_return_the_initial_state(backend, batch, seqlen):
    """T = 0 and an empty batch (B = 0)."""
    case = Case(batch=batch, lengths=None, seqlen=seqlen, heads=2, k=4, v=4, initial_state=True, seed=0)
    q, k, v, g, beta, h0 = make_gated_inputs(case, torch.float32, DEVICE)
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend=backend)
    assert o.shape == (batch, seqlen, 2, 4)
    torch.testing.assert_close(s, h0)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: the full-size bf16 check is too slow for the interpreter")
@pytest.mark.parametrize("shape", [(8, 2048), (2, 8192)])
def test_anchor_shapes_bf16(shape):
    """fla 0.6 refuses this backward on Hopper with Triton 3.4-3.7.0 (a miscompiled kernel); ours
    must match the float64 reference there, every gradient included."""
    B, T = shape
    case = Case(batch=B, lengths=None, seqlen=T, heads=16, k=128, v=128, initial_state=True, seed=11)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, 16, generator=torch.Generator().manual_seed(3))) / 4
    _compare(case, torch.bfloat16, g=g)

