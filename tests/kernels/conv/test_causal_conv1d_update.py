"""The decoding path of the short causal conv: token by token equals one call, Triton against the
float64 reference (outputs and the state updated in place), bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.kernels import BackendUnavailable, causal_conv1d, causal_conv1d_update
from tests.helpers import DEVICE, KERNEL_DTYPES, TOL, assert_rel


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("W", [1, 4])
def test_token_by_token_equals_one_call(backend, W):
    g = torch.Generator().manual_seed(W)
    x, w, b = torch.randn(2, 9, 6, generator=g), torch.randn(6, W, generator=g), torch.randn(6, generator=g)
    h0 = torch.randn(2, 6, W - 1, generator=g)
    full, final = causal_conv1d(x, w, b, activation="silu", initial_state=h0, output_final_state=True)
    x, w, b, state = (t.to(DEVICE) for t in (x, w, b, h0.clone()))
    steps = [causal_conv1d_update(x[:, :3], state, w, b, "silu", backend=backend)]  # a few tokens, then one by one
    steps += [causal_conv1d_update(x[:, t], state, w, b, "silu", backend=backend).unsqueeze(1) for t in range(3, 9)]
    assert_rel(torch.cat(steps, 1), full, TOL[torch.float32], "decoded output")
    assert_rel(state, final, TOL[torch.float32], "state")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@settings(max_examples=6)
@given(T=st.integers(1, 4), W=st.integers(2, 6), D=st.sampled_from([5, 64, 130]), one_token=st.booleans(),
       with_bias=st.booleans(), activation=st.sampled_from([None, "silu"]), seed=st.integers(0, 2**31 - 1))
def test_triton_matches_reference(dtype, T, W, D, one_token, with_bias, activation, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *(() if one_token else (T,)), D, generator=g)
    w, b, h0 = torch.randn(D, W, generator=g), torch.randn(D, generator=g), torch.randn(3, D, W - 1, generator=g)
    results = []
    for dt, backend in ((dtype, "triton"), (torch.float64, "reference")):
        state = h0.to(DEVICE, torch.float32 if dt != torch.float64 else dt, copy=True)
        out = causal_conv1d_update(x.to(DEVICE, dt), state, w.to(DEVICE, dt), b.to(DEVICE, dt) if with_bias else None,
                                   activation, backend=backend)
        results.append((out, state))
    assert results[0][0].shape == x.shape
    assert_rel(results[0][0], results[1][0], TOL[dtype], "output")
    assert_rel(results[0][1], results[1][1], TOL[dtype], "updated state")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"x": torch.randn(2, 3, 4, 4)}, r"x must have shape \[B, D\] or \[B, T, D\]"),
        ({"conv_state": torch.randn(2, 4, 2)}, r"conv_state must have shape \[B, D, W-1\]"),
        ({"weight": torch.randn(5, 4)}, r"weight must have shape \[D, W\]"),
        ({"activation": "relu"}, "activation must be one of"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"x": torch.randn(2, 4), "conv_state": torch.randn(2, 4, 3), "weight": torch.randn(4, 4)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        causal_conv1d_update(args.pop("x"), args.pop("conv_state"), args.pop("weight"), **args)


def test_triton_refuses_calls_that_need_gradients():
    x = torch.randn(2, 4, device=DEVICE, requires_grad=True)
    with pytest.raises(BackendUnavailable, match="update kernels compute no gradients"):
        causal_conv1d_update(x, torch.zeros(2, 4, 3, device=DEVICE), torch.randn(4, 4, device=DEVICE), backend="triton")
