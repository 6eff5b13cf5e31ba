"""Fused Triton SSD against the float64 reference: outputs, final states and every gradient.

Without a GPU the kernels run in Triton's interpreter (float32, small shapes);
with one, the same tests run compiled, in float32 and bfloat16, at larger shapes.
"""

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.kernels.mamba2 import ssd, ssd_chunked
from tests.helpers import DEVICE, KERNEL_DTYPES, ON_GPU, TOL, assert_rel
from tests.kernels.contract import check_against_oracle
from tests.kernels.mamba2.cases import Case, cases, make_inputs

NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]


def _oracle(case, inputs, **kw):
    """The chunked reference in float64 on the same inputs."""
    up = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    y, s = ssd_chunked(*up[:5], **{**case.kwargs(up), **kw}, output_final_state=True)
    return up, y, s


def _check_against_oracle(case, dtype, final_state=True, **kw):
    inputs = make_inputs(case, dtype, DEVICE, requires_grad=True)
    return check_against_oracle(partial(ssd, backend="triton", **kw), partial(ssd_chunked, **kw), NAMES, inputs,
                                case.kwargs, case.seed, dtype, final_state)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@settings(max_examples=6)
@given(case=cases())
def test_chunked_matches_reference(case, dtype):
    _check_against_oracle(case, dtype)


@pytest.mark.slow
def test_strong_decay_long_sequence():
    """dt' A around -20 per step (exp underflows in float32) over 5 chunks and a packed boundary:
    finite, and equal to the float64 reference, gradients included."""
    case = Case(batch=1, lengths=(130, 170), seqlen=300, heads=2, groups=1, p=4, n=8, initial_state=True,
                extras=False, seed=21, log_decay=40.0)
    y, s = _check_against_oracle(case, torch.float32)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()


@pytest.mark.slow
def test_dt_limit_and_large_softplus_inputs():
    """The clamp stops gradients where it bites; softplus passes large inputs through (F.softplus's threshold)."""
    case = Case(batch=2, lengths=None, seqlen=70, heads=2, groups=2, p=3, n=5, initial_state=True, extras=True,
                seed=22)
    _check_against_oracle(case, torch.float32, dt_limit=(0.2, 0.6))
    inputs = make_inputs(case, torch.float32, DEVICE, requires_grad=True)
    with torch.no_grad():
        inputs[7].add_(25.0)  # dt + bias above softplus's threshold everywhere; a big dt' decays fast
    y, _ = ssd(*inputs[:5], **case.kwargs(inputs), backend="triton")
    up, y_ref, _ = _oracle(case, inputs)
    assert_rel(y, y_ref, TOL[torch.float32], "output")
    grads = torch.autograd.grad(y.square().sum(), [inputs[1], inputs[2], inputs[7]])
    ref_grads = torch.autograd.grad(y_ref.square().sum(), [up[1], up[2], up[7]])
    for name, a, b in zip(("dt", "A", "dt_bias"), grads, ref_grads, strict=True):
        assert_rel(a, b, TOL[torch.float32], f"d{name}")


def test_gradients_without_final_state():
    case = Case(batch=1, lengths=(50, 81), seqlen=131, heads=4, groups=2, p=8, n=16, initial_state=True,
                extras=True, seed=4)
    _check_against_oracle(case, torch.float32, final_state=False)


def test_initial_state_without_gradient():
    case = Case(batch=2, lengths=None, seqlen=65, heads=2, groups=1, p=8, n=16, initial_state=True, extras=True,
                seed=6)
    inputs = make_inputs(case, torch.float32, DEVICE, requires_grad=True)
    inputs[8].requires_grad_(False)
    y, _ = ssd(*inputs[:5], **case.kwargs(inputs), backend="triton")
    up, y_ref, _ = _oracle(case, inputs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    grads = torch.autograd.grad((y * dy).sum(), inputs[:8])
    ref_grads = torch.autograd.grad((y_ref * dy.double()).sum(), up[:8])
    for name, a, b in zip(NAMES, grads, ref_grads, strict=False):
        assert_rel(a, b, TOL[torch.float32], f"d{name}")


def test_float16():
    """Half precision that the interpreter also gets right (bf16 it does not): every cast to the inputs' dtype."""
    case = Case(batch=1, lengths=(30, 70), seqlen=100, heads=2, groups=1, p=8, n=16, initial_state=True,
                extras=True, seed=8)
    _check_against_oracle(case, torch.float16)


def test_packed_sequences_with_empty_ones_keep_their_states():
    """A zero-length sequence in cu_seqlens passes its initial state through."""
    case = Case(batch=1, lengths=(0, 70, 0, 5), seqlen=75, heads=2, groups=1, p=3, n=5, initial_state=True,
                extras=False, seed=5)
    _, s = _check_against_oracle(case, torch.float32)
    h0 = make_inputs(case, torch.float32, DEVICE)[8]
    torch.testing.assert_close(s[0], h0[0])
    torch.testing.assert_close(s[2], h0[2])


@settings(max_examples=6)
@given(case=cases(max_t=12), dtype=st.sampled_from(KERNEL_DTYPES))
def test_recurrent_decoding_matches_reference(case, dtype):
    """Without gradients and with few tokens per sequence the token-by-token kernel serves the call."""
    inputs = make_inputs(case, dtype, DEVICE)
    with torch.no_grad():
        y, s = ssd(*inputs[:5], **case.kwargs(inputs), output_final_state=True, backend="triton")
        _, y_ref, s_ref = _oracle(case, inputs)
    assert_rel(y, y_ref, TOL[dtype], "output")
    assert_rel(s, s_ref, TOL[dtype], "final state")


def test_decoding_under_strong_decay_and_clamp():
    case = Case(batch=3, lengths=None, seqlen=4, heads=2, groups=2, p=8, n=16, initial_state=True, extras=True,
                seed=10, log_decay=40.0)
    inputs = make_inputs(case, torch.float32, DEVICE)
    with torch.no_grad():
        y, s = ssd(*inputs[:5], **case.kwargs(inputs), dt_limit=(0.1, 2.0), output_final_state=True,
                   backend="triton")
        _, y_ref, s_ref = _oracle(case, inputs, dt_limit=(0.1, 2.0))
    assert_rel(y, y_ref, TOL[torch.float32], "output")
    assert_rel(s, s_ref, TOL[torch.float32], "final state")


def test_chunked_forward_without_gradients():
    """Inference on long inputs takes the chunked forward without the autograd wrapper."""
    case = Case(batch=2, lengths=None, seqlen=150, heads=2, groups=1, p=8, n=16, initial_state=False, extras=True,
                seed=9)
    inputs = make_inputs(case, torch.float32, DEVICE)
    with torch.no_grad():
        y, s = ssd(*inputs[:5], **case.kwargs(inputs), output_final_state=True, backend="triton")
        _, y_ref, s_ref = _oracle(case, inputs)
    assert_rel(y, y_ref, TOL[torch.float32], "output")
    assert_rel(s, s_ref, TOL[torch.float32], "final state")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: the full-size bf16 check is too slow for the interpreter")
@pytest.mark.parametrize("shape", [(8, 2048), (2, 8192)])
def test_anchor_shapes_bf16(shape):
    B, T = shape
    case = Case(batch=B, lengths=None, seqlen=T, heads=64, groups=1, p=64, n=128, initial_state=True, extras=True,
                seed=11)
    _check_against_oracle(case, torch.bfloat16)
