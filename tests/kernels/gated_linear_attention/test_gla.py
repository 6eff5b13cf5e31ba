"""Gated linear attention: the chunked reference against the recurrence (float64), the fused Triton
kernels against the float64 reference (outputs, final states, gradients of q, k, v, g and the
initial state), extreme decays, decoding, and bad input.

Without a GPU the kernels run in Triton's interpreter (float32, small shapes); with one, the same
tests run compiled, and the anchor shapes are checked in bfloat16.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.kernels import gla
from seqmix.kernels.gated_linear_attention import gla_chunked, gla_recurrent
from tests.helpers import DEVICE, KERNEL_DTYPES, ON_GPU, TOL, assert_rel
from tests.kernels.contract import (
    assert_grads,
    check_chunked_gradients_match_recurrence,
    check_chunked_matches_recurrence,
    outputs_and_grads,
)
from tests.kernels.deltanet.cases import Case, cases

NAMES = ["q", "k", "v", "g", "initial_state"]


def make_inputs(case: Case, dtype, device, requires_grad=False, g=None):
    """q, k, v in ``dtype``; g [B, T, H, K] float32 log decays, logsigmoid of normals (as the GLA
    layer makes them) unless given; an initial state or None."""
    gen = torch.Generator().manual_seed(case.seed)
    B, T, H, K, V = case.batch, case.seqlen, case.heads, case.k, case.v
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    if g is None:
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, generator=gen))
    h0 = torch.randn(case.num_sequences, H, K, V, generator=gen) if case.initial_state else None
    tensors = [t.to(device=device, dtype=dtype) for t in (q, k, v)] + [g.to(device), h0]
    return [None if t is None else t.to(device).requires_grad_(requires_grad) for t in tensors]


def _compare(case, dtype, g=None, scale=None, dg_scale=False):
    """The Triton op against the float64 chunked reference on the same inputs."""
    inputs = make_inputs(case, dtype, DEVICE, requires_grad=True, g=g)
    scale = case.k**-0.5 if scale is None else scale
    cu = case.cu_seqlens(DEVICE)

    def fused(q, k, v, g, h0):
        return gla(q, k, v, g, scale=scale, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                   backend="triton")

    o, s, grads = outputs_and_grads(fused, inputs, case.seed + 1)
    up = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    o_ref, s_ref, ref_grads = outputs_and_grads(lambda *x: gla_chunked(*x[:4], scale, x[4], True, cu), up,
                                                case.seed + 1)
    tol = TOL[dtype]
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_rel(o, o_ref, tol, "output")
    assert_rel(s, s_ref, tol, "final state")
    assert_grads([n for n, t in zip(NAMES, inputs) if t is not None], grads, ref_grads, tol, dg_scale)


@settings(max_examples=10)
@given(case=cases(max_t=150, head_dims=(3, 8, 16)), chunk_size=st.sampled_from([16, 64]))
def test_chunked_form_matches_recurrence(case, chunk_size):
    q, k, v, g, h0 = make_inputs(case, torch.float64, "cpu")
    cu = case.cu_seqlens("cpu")
    check_chunked_matches_recurrence(gla_recurrent, gla_chunked, (q, k, v, g.double(), h0),
                                     lambda fn, *x, **kw: fn(*x[:4], 0.7, x[4], True, cu, **kw), chunk_size)


@settings(max_examples=8)
@given(case=cases(max_t=70, head_dims=(4, 8)))
def test_chunked_form_gradients_match_recurrence(case):
    inputs = make_inputs(case, torch.float64, "cpu")
    cu = case.cu_seqlens("cpu")
    check_chunked_gradients_match_recurrence(gla_recurrent, gla_chunked, inputs,
                                             lambda fn, *x: fn(*x[:4], 0.5, x[4], True, cu), NAMES, case.seed, 1e-11)


def test_recurrence_is_the_contract():
    """One step by hand: S1 = diag(e^g) S0 + k v^T, o = scale S1^T q."""
    gen = torch.Generator().manual_seed(0)
    q, k, g = (torch.randn(1, 1, 1, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    g = -g.abs()
    v = torch.randn(1, 1, 1, 2, generator=gen, dtype=torch.float64)
    s0 = torch.randn(1, 1, 3, 2, generator=gen, dtype=torch.float64)
    o, s1 = gla_recurrent(q, k, v, g, 0.3, s0, True)
    S1 = torch.exp(g[0, 0, 0])[:, None] * s0[0, 0] + torch.outer(k[0, 0, 0], v[0, 0, 0])
    torch.testing.assert_close(s1[0, 0], S1)
    torch.testing.assert_close(o[0, 0, 0], 0.3 * S1.T @ q[0, 0, 0])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@settings(max_examples=5)
@given(case=cases(max_t=100, head_dims=(5, 16, 32)))
def test_triton_matches_reference(case, dtype):
    _compare(case, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_largest_head_dims(dtype):
    case = Case(batch=1, lengths=None, seqlen=20, heads=1, k=256, v=200, initial_state=True, seed=3)
    _compare(case, dtype, scale=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["all -20", "-20 and near 0"])
def test_extreme_decays_stay_finite_and_exact(pattern):
    """Per-channel log decays of -20 reach -1280 inside a chunk: exp(b_i) * exp(-b_j) would overflow;
    secondary chunking never forms it. Mixed with decays near 0, channels keep memory across chunks."""
    case = Case(batch=1, lengths=(150, 50), seqlen=200, heads=1, k=16, v=16, initial_state=True, seed=21)
    shape = (1, case.seqlen, case.heads, case.k)
    gen = torch.Generator().manual_seed(5)
    if pattern == "all -20":
        g = torch.full(shape, -20.0)
    else:
        g = torch.where(torch.rand(shape, generator=gen) < 0.3, -20.0, -1e-3 * torch.rand(shape, generator=gen))
    _compare(case, torch.float32, g=g, dg_scale=True)


@settings(max_examples=5)
@given(case=cases(max_t=12), dtype=st.sampled_from(KERNEL_DTYPES))
def test_recurrent_decoding_matches_reference(case, dtype):
    """Without gradients and with few tokens per sequence the token-by-token kernel serves the call."""
    q, k, v, g, h0 = make_inputs(case, dtype, DEVICE)
    cu = case.cu_seqlens(DEVICE)
    with torch.no_grad():
        o, s = gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="triton")
        up = [None if t is None else t.double() for t in (q, k, v, g, h0)]
        o_ref, s_ref = gla_chunked(*up[:4], case.k**-0.5, up[4], True, cu)
    assert_rel(o, o_ref, TOL[dtype], "output")
    assert_rel(s, s_ref, TOL[dtype], "final state")


@pytest.mark.slow
def test_16k_tokens_of_strong_decay_stay_finite():
    """16K tokens in the float32 reference with per-channel decays from exp(-20) to 1."""
    case = Case(batch=1, lengths=None, seqlen=16384, heads=1, k=4, v=4, initial_state=True, seed=17)
    shape = (1, case.seqlen, 1, 4)
    gen = torch.Generator().manual_seed(1)
    g = torch.where(torch.rand(shape, generator=gen) < 0.5, -20.0, -1e-4 * torch.rand(shape, generator=gen))
    q, k, v, g, h0 = make_inputs(case, torch.float32, "cpu", requires_grad=True, g=g)
    o, s = gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="reference")
    (o.sum() + s.sum()).backward()
    for name, t in (("o", o), ("s", s), ("dg", g.grad), ("dq", q.grad), ("dh0", h0.grad)):
        assert torch.isfinite(t).all(), f"{name} is not finite"


def test_bad_inputs_name_the_argument():
    case = Case(batch=2, lengths=None, seqlen=8, heads=2, k=4, v=4, initial_state=False, seed=0)
    q, k, v, g, _ = make_inputs(case, torch.float32, DEVICE)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match=r"g must have shape \[B, T, H, K\] \(4 dims\)"):
            gla(q, k, v, g[..., 0], backend=backend)
        with pytest.raises(ValueError, match=r"g must have shape \[B, T, H, K\] = \(2, 8, 2, 4\)"):
            gla(q, k, v, g[..., :3], backend=backend)
        # a check of g's values: CPU tensors (on CUDA tensors a device-side assertion, tests/kernels/test_checks.py)
        with pytest.raises(ValueError, match="g holds log decays and must be <= 0 everywhere, got a maximum of 0.25"):
            gla(q.cpu(), k.cpu(), v.cpu(), g.clone().cpu().index_fill_(1, torch.tensor([2]), 0.25), backend=backend)
        with pytest.raises(ValueError, match=r"k must have shape \[B, T, H, K\]"):
            gla(q, k[:, :, :1], v, g, backend=backend)
        with pytest.raises(ValueError, match="must share one dtype"):
            gla(q, k, v.double(), g, backend=backend)
        with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, K, V\]"):
            gla(q, k, v, g, initial_state=torch.zeros(2, 2, 4, 5, device=DEVICE), backend=backend)
        flat = [t.reshape(1, 16, *t.shape[2:]) for t in (q, k, v, g)]
        with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
            gla(*flat, cu_seqlens=torch.tensor([0, 9, 4, 16], device=DEVICE), backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("batch, seqlen", [(2, 0), (0, 5)])
def test_no_tokens_return_the_initial_state(backend, batch, seqlen):
    """T = 0 and an empty batch (B = 0)."""
    case = Case(batch=batch, lengths=None, seqlen=seqlen, heads=2, k=4, v=4, initial_state=True, seed=0)
    q, k, v, g, h0 = make_inputs(case, torch.float32, DEVICE)
    o, s = gla(q, k, v, g, initial_state=h0, output_final_state=True, backend=backend)
    assert o.shape == (batch, seqlen, 2, 4)
    torch.testing.assert_close(s, h0)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: the full-size bf16 check is too slow for the interpreter")
@pytest.mark.parametrize("shape", [(8, 2048), (2, 8192)])
def test_anchor_shapes_bf16(shape):
    B, T = shape
    case = Case(batch=B, lengths=None, seqlen=T, heads=16, k=128, v=128, initial_state=True, seed=11)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, 16, 128, generator=torch.Generator().manual_seed(3))) / 16
    _compare(case, torch.bfloat16, g=g)


# The CPU reference's two forms of the scores (docs/math/gla.md, "The CPU reference"): factored through each
# chunk's first row (hand-written backward) where the chunk's total decay allows, secondary chunking otherwise.

def _reference_grads(fn, inputs, cu, seed=7):
    """Output, final state and the gradients of every input (initial state included) of ``fn`` (gla_chunked or
    gla_recurrent) for one random loss of both results."""
    return outputs_and_grads(lambda *x: fn(*x[:4], 0.6, x[4], True, cu), inputs, seed)


def _only(form, monkeypatch):
    """Make the other form of the scores fail if called: the test then checks ``form`` only."""
    from seqmix.kernels.gated_linear_attention import reference

    other = {"factored": "_chunked_subchunks", "subchunks": "_chunked_factored"}[form]

    def refuse(*args, **kwargs):
        raise AssertionError(f"{other} was called")

    monkeypatch.setattr(reference, other, refuse)


def _assert_matches_oracle(case, g, dtype, tol, dg_scale=False):
    inputs = [None if t is None else t.detach().to(dtype).requires_grad_()
              for t in make_inputs(case, dtype, "cpu", g=g)]
    cu = case.cu_seqlens("cpu")
    o, s, grads = _reference_grads(gla_chunked, inputs, cu)
    up = [t.detach().double().requires_grad_() for t in inputs if t is not None]
    o_ref, s_ref, ref_grads = _reference_grads(gla_recurrent, up + [None] * (5 - len(up)), cu)
    assert o.dtype == dtype and torch.isfinite(o).all() and torch.isfinite(s).all()
    assert_rel(o, o_ref, tol, "output")
    assert_rel(s, s_ref, tol, "final state")
    assert_grads([n for n, t in zip(NAMES, inputs) if t is not None], grads, ref_grads, tol, dg_scale)


@pytest.mark.parametrize("case", [
    Case(batch=2, lengths=None, seqlen=150, heads=2, k=8, v=5, initial_state=True, seed=1),  # ragged: 150 = 2*64 + 22
    Case(batch=1, lengths=(70, 0, 1, 64), seqlen=135, heads=1, k=16, v=4, initial_state=True, seed=2),
    Case(batch=2, lengths=None, seqlen=40, heads=3, k=4, v=8, initial_state=False, seed=3),
])
def test_factored_backward_matches_the_oracle_float64(case, monkeypatch):
    """Mild decays: the factored form serves; every gradient (g and the initial state included) against the
    float64 recurrence."""
    _only("factored", monkeypatch)
    _assert_matches_oracle(case, None, torch.float64, 1e-11)


@pytest.mark.parametrize("per_token", [-0.01, -0.68])
def test_factored_form_in_float32_up_to_its_limit(per_token, monkeypatch):
    """float32 against the float64 oracle; at -0.68 per token a chunk of 64 decays by -43.5, just inside
    factored_limit (e^44): exp(-gcum) reaches e^43.5 and nothing overflows."""
    from seqmix.kernels.gated_linear_attention.reference import factored_limit

    assert 64 * per_token > -factored_limit(torch.float32)
    _only("factored", monkeypatch)
    case = Case(batch=2, lengths=None, seqlen=130, heads=2, k=16, v=8, initial_state=True, seed=4)
    g = per_token * torch.rand(2, 130, 2, 16, generator=torch.Generator().manual_seed(0)).add_(0.5).clamp_(max=1)
    _assert_matches_oracle(case, g, torch.float32, 2e-5, dg_scale=True)


@pytest.mark.parametrize("pattern", ["all -20", "-20 and near 0"])
def test_strong_decays_in_float32_take_the_secondary_chunking(pattern, monkeypatch):
    """Decays of -20 per token pass factored_limit within a chunk: the scores by secondary chunking serve,
    outputs and every gradient stay finite and equal the float64 oracle's."""
    _only("subchunks", monkeypatch)
    case = Case(batch=1, lengths=(90, 40), seqlen=130, heads=1, k=8, v=8, initial_state=True, seed=5)
    shape = (1, 130, 1, 8)
    gen = torch.Generator().manual_seed(6)
    if pattern == "all -20":
        g = torch.full(shape, -20.0)
    else:
        g = torch.where(torch.rand(shape, generator=gen) < 0.3, -20.0, -1e-3 * torch.rand(shape, generator=gen))
    _assert_matches_oracle(case, g, torch.float32, 2e-5, dg_scale=True)
