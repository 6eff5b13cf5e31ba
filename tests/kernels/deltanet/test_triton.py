"""Fused Triton delta rule against the float64 reference: outputs, final states and every gradient.

Without a GPU the kernels run in Triton's interpreter (float32, small shapes);
with one, the same tests run compiled, in float32 and bfloat16, at larger shapes.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seqmix.kernels.deltanet import delta_rule, delta_rule_chunked
from tests.helpers import DEVICE, KERNEL_DTYPES, ON_GPU, TOL, assert_rel
from tests.kernels.deltanet.cases import Case, cases, make_inputs


def _oracle(case, q, k, v, beta, h0, scale):
    """The chunked reference in float64 on the same inputs."""
    up = [None if t is None else t.detach().double().requires_grad_() for t in (q, k, v, beta, h0)]
    o, s = delta_rule_chunked(*up[:4], scale, up[4], True, case.cu_seqlens(q.device))
    return up, o, s


def _check_against_oracle(case, dtype, scale=None, final_state=True):
    """Outputs, final state and the gradients of every input; with ``final_state=False``
    no final state is asked for, so no gradient flows in through it."""
    q, k, v, beta, h0 = make_inputs(case, dtype, DEVICE, requires_grad=True)
    scale = case.k**-0.5 if scale is None else scale
    o, s = delta_rule(q, k, v, beta, scale=scale, initial_state=h0, output_final_state=final_state,
                      cu_seqlens=case.cu_seqlens(DEVICE), backend="triton")
    up, o_ref, s_ref = _oracle(case, q, k, v, beta, h0, scale)
    tol = TOL[dtype]
    assert o.dtype == dtype
    assert_rel(o, o_ref, tol, "output")
    if final_state:
        assert s.dtype == torch.float32
        assert_rel(s, s_ref, tol, "final state")
    else:
        assert s is None

    g = torch.Generator().manual_seed(case.seed + 1)
    do = torch.randn(o.shape, generator=g).to(DEVICE)
    dht = torch.randn(s_ref.shape, generator=g).to(DEVICE) if final_state else torch.zeros(s_ref.shape, device=DEVICE)
    inputs = [t for t in (q, k, v, beta, h0) if t is not None]
    loss = (o.float() * do).sum() + ((s * dht).sum() if final_state else 0)
    grads = torch.autograd.grad(loss, inputs)
    ref_inputs = [t for t in up if t is not None]
    ref_grads = torch.autograd.grad((o_ref * do.double()).sum() + (s_ref * dht.double()).sum(), ref_inputs)
    for name, a, b in zip(["q", "k", "v", "beta", "initial_state"][: len(inputs)], grads, ref_grads, strict=True):
        assert a.dtype == (torch.float32 if name == "initial_state" else dtype)
        assert_rel(a, b, tol, f"d{name}")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@given(case=cases())
def test_chunked_matches_reference(case, dtype):
    _check_against_oracle(case, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("dims", [(256, 256), (256, 16), (16, 200)])
def test_largest_head_dims(dims, dtype):
    case = Case(batch=1, lengths=None, seqlen=70, heads=1, k=dims[0], v=dims[1], initial_state=True, seed=3)
    _check_against_oracle(case, dtype, scale=0.1)


@pytest.mark.slow
def test_long_sequence():
    """Errors must not grow along 16 chunks of state passing."""
    case = Case(batch=1, lengths=None, seqlen=1024, heads=1, k=16, v=16, initial_state=True, seed=12)
    _check_against_oracle(case, torch.float32)


def test_repeated_keys_and_extreme_betas():
    """Identical keys with beta 1 make (I + A) an all-ones lower triangle; beta 0 writes nothing."""
    case = Case(batch=1, lengths=None, seqlen=100, heads=2, k=16, v=8, initial_state=False, seed=13)
    q, k, v, beta, _ = make_inputs(case, torch.float32, DEVICE)
    k = k[:, :1].expand_as(k).contiguous()
    beta = (torch.arange(case.seqlen, device=DEVICE) % 3 != 0).float()[None, :, None].expand_as(beta).contiguous()
    inputs = [t.requires_grad_() for t in (q, k, v, beta)]
    o, s = delta_rule(*inputs, output_final_state=True, backend="triton")
    up, o_ref, s_ref = _oracle(case, *inputs, None, case.k**-0.5)
    assert_rel(o, o_ref, TOL[torch.float32], "output")
    assert_rel(s, s_ref, TOL[torch.float32], "final state")
    grads = torch.autograd.grad(o.sum() + s.sum(), inputs)
    ref_grads = torch.autograd.grad(o_ref.sum() + s_ref.sum(), up[:4])
    for name, a, b in zip(["q", "k", "v", "beta"], grads, ref_grads, strict=True):
        assert_rel(a, b, TOL[torch.float32], f"d{name}")


def test_gradients_without_final_state():
    case = Case(batch=1, lengths=(50, 81), seqlen=131, heads=2, k=32, v=16, initial_state=True, seed=4)
    _check_against_oracle(case, torch.float32, final_state=False)


def test_initial_state_without_gradient():
    case = Case(batch=2, lengths=None, seqlen=65, heads=1, k=16, v=16, initial_state=True, seed=6)
    q, k, v, beta, h0 = make_inputs(case, torch.float32, DEVICE, requires_grad=True)
    h0.requires_grad_(False)
    o, _ = delta_rule(q, k, v, beta, initial_state=h0, backend="triton")
    up, o_ref, _ = _oracle(case, q, k, v, beta, h0, case.k**-0.5)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    grads = torch.autograd.grad((o * do).sum(), (q, k, v, beta))
    ref_grads = torch.autograd.grad((o_ref * do.double()).sum(), up[:4])
    for name, a, b in zip(["q", "k", "v", "beta"], grads, ref_grads, strict=True):
        assert_rel(a, b, TOL[torch.float32], f"d{name}")


def test_float16():
    """Half precision that the interpreter also gets right (bf16 it does not): every cast to the inputs' dtype."""
    case = Case(batch=1, lengths=(30, 70), seqlen=100, heads=2, k=24, v=32, initial_state=True, seed=8)
    _check_against_oracle(case, torch.float16)


def test_packed_sequences_with_empty_ones_keep_their_states():
    """A zero-length sequence in cu_seqlens passes its initial state through."""
    case = Case(batch=1, lengths=(0, 70, 0, 5), seqlen=75, heads=2, k=16, v=16, initial_state=True, seed=5)
    _check_against_oracle(case, torch.float32)
    q, k, v, beta, h0 = make_inputs(case, torch.float32, DEVICE)
    _, s = delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True,
                      cu_seqlens=case.cu_seqlens(DEVICE), backend="triton")
    torch.testing.assert_close(s[0], h0[0])
    torch.testing.assert_close(s[2], h0[2])


@given(case=cases(max_t=12), dtype=st.sampled_from(KERNEL_DTYPES))
def test_recurrent_decoding_matches_reference(case, dtype):
    """Without gradients and with few tokens per sequence the token-by-token kernel serves the call."""
    q, k, v, beta, h0 = make_inputs(case, dtype, DEVICE)
    with torch.no_grad():
        o, s = delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True,
                          cu_seqlens=case.cu_seqlens(DEVICE), backend="triton")
        _, o_ref, s_ref = _oracle(case, q, k, v, beta, h0, case.k**-0.5)
    assert_rel(o, o_ref, TOL[dtype], "output")
    assert_rel(s, s_ref, TOL[dtype], "final state")


def test_chunked_forward_without_gradients():
    """Inference on long inputs takes the chunked forward without the autograd wrapper."""
    case = Case(batch=2, lengths=None, seqlen=150, heads=2, k=32, v=24, initial_state=False, seed=9)
    q, k, v, beta, _ = make_inputs(case, torch.float32, DEVICE)
    with torch.no_grad():
        o, s = delta_rule(q, k, v, beta, output_final_state=True, backend="triton")
        _, o_ref, s_ref = _oracle(case, q, k, v, beta, None, case.k**-0.5)
    assert_rel(o, o_ref, TOL[torch.float32], "output")
    assert_rel(s, s_ref, TOL[torch.float32], "final state")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: the full-size bf16 check is too slow for the interpreter")
@pytest.mark.parametrize("shape", [(8, 2048), (2, 8192)])
def test_anchor_shapes_bf16(shape):
    B, T = shape
    case = Case(batch=B, lengths=None, seqlen=T, heads=16, k=128, v=128, initial_state=True, seed=11)
    _check_against_oracle(case, torch.bfloat16)
