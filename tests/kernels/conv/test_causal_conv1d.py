"""The short causal conv: the contract by hand, states across splits, packed sequences, bad input."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seqmix.kernels import causal_conv1d
from tests.helpers import DEVICE, KERNEL_DTYPES, ON_GPU, TOL, assert_rel
from tests.kernels.conv.strategies import batch_layout


def _by_hand(x, weight, bias, activation, state):
    """out[t, d] = bias[d] + sum_j weight[d, j] * x[t - (W-1) + j, d], taps before t=0 reading the state."""
    B, T, D = x.shape
    W = weight.shape[1]
    xs = torch.cat([state.transpose(1, 2), x], 1)  # position p of xs is token p - (W-1)
    out = torch.zeros(B, T, D, dtype=x.dtype)
    for t in range(T):
        for j in range(W):
            out[:, t] += weight[:, j] * xs[:, t + j]
    if bias is not None:
        out += bias
    return torch.nn.functional.silu(out) if activation == "silu" else out


@given(T=st.integers(1, 12), W=st.integers(1, 6), activation=st.sampled_from([None, "silu"]),
       with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_the_contract(T, W, activation, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, 3, generator=g, dtype=torch.float64)
    weight = torch.randn(3, W, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64) if with_bias else None
    state = torch.randn(2, 3, W - 1, generator=g, dtype=torch.float64)
    out, final = causal_conv1d(x, weight, bias, activation=activation, initial_state=state, output_final_state=True)
    assert_rel(out, _by_hand(x, weight, bias, activation, state), 1e-12, "output")
    tail = torch.cat([state.transpose(1, 2), x], 1)[:, T:]
    torch.testing.assert_close(final, tail.transpose(1, 2))


@given(split=st.integers(0, 20), W=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_pieces_with_state_equal_one_call(split, W, seed):
    g = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(2, 20, 4, generator=g), torch.randn(4, W, generator=g)
    full, s_full = causal_conv1d(x, weight, activation="silu", initial_state=torch.zeros(2, 4, W - 1),
                                 output_final_state=True)
    a, s = causal_conv1d(x[:, :split], weight, activation="silu", initial_state=torch.zeros(2, 4, W - 1),
                         output_final_state=True)
    b, s = causal_conv1d(x[:, split:], weight, activation="silu", initial_state=s, output_final_state=True)
    assert_rel(torch.cat([a, b], 1), full, 1e-6, "output")
    torch.testing.assert_close(s, s_full)


def test_packed_sequences_equal_separate_calls():
    g = torch.Generator().manual_seed(1)
    lengths = [5, 0, 9, 2]
    x, weight, bias = torch.randn(1, 16, 4, generator=g), torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    states = torch.randn(4, 4, 2, generator=g)
    cu = torch.tensor([0, 5, 5, 14, 16])
    out, final = causal_conv1d(x, weight, bias, initial_state=states, output_final_state=True, cu_seqlens=cu)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, f_n = causal_conv1d(x[:, s:e], weight, bias, initial_state=states[n : n + 1], output_final_state=True)
        torch.testing.assert_close(out[:, s:e], o_n)
        torch.testing.assert_close(final[n : n + 1], f_n)
    assert sum(lengths) == 16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"x": torch.randn(2, 5)}, r"x must have shape \[B, T, D\]"),
        ({"weight": torch.randn(3, 4)}, r"weight must have shape \[D, W\]"),
        ({"weight": torch.randn(4, 0)}, "W >= 1"),
        ({"bias": torch.randn(5)}, r"bias must have shape \[D\]"),
        ({"activation": "gelu"}, "activation must be one of"),
        ({"initial_state": torch.randn(2, 4, 4)}, r"initial_state must have shape \[N, D, W-1\]"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"x": torch.randn(2, 5, 4), "weight": torch.randn(4, 4)}
    args.update(kwargs)
    x, weight = args.pop("x"), args.pop("weight")
    with pytest.raises(ValueError, match=match):
        causal_conv1d(x, weight, **args)


# Odd channel counts cover the masked channel blocks; the GPU adds the anchors' width.
CHANNELS = [64, 200, 4096] if ON_GPU else [8, 24, 130]


@st.composite
def conv_cases(draw):
    batch, T, lengths = draw(batch_layout(80, 4, 150))
    return {
        "batch": batch, "T": T, "lengths": lengths, "D": draw(st.sampled_from(CHANNELS)),
        "W": draw(st.integers(1, 6)), "activation": draw(st.sampled_from([None, "silu"])),
        "bias": draw(st.booleans()), "state": draw(st.booleans()), "seed": draw(st.integers(0, 2**31 - 1)),
    }


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@given(case=conv_cases())
def test_triton_matches_reference(case, dtype):
    """Outputs, final states and the gradients of x, weight, bias and the initial state."""
    g = torch.Generator().manual_seed(case["seed"])
    B, T, D, W = case["batch"], case["T"], case["D"], case["W"]
    cu = None
    if case["lengths"] is not None:
        cu = torch.tensor([0, *case["lengths"]]).cumsum(0).to(DEVICE)
    n = B if cu is None else cu.numel() - 1
    x = torch.randn(B, T, D, generator=g)
    w = torch.randn(D, W, generator=g) / W**0.5
    b = torch.randn(D, generator=g) if case["bias"] else None
    h0 = torch.randn(n, D, W - 1, generator=g) if case["state"] else None
    fused = [None if t is None else t.to(DEVICE, dtype if t is not h0 else torch.float32).requires_grad_()
             for t in (x, w, b, h0)]
    exact = [None if t is None else t.double().requires_grad_() for t in (x, w, b, h0)]
    runs = []
    for (xx, ww, bb, hh), backend in ((fused, "triton"), (exact, "reference")):
        cu_b = None if cu is None else cu.to(xx.device)
        out, final = causal_conv1d(xx, ww, bb, activation=case["activation"], initial_state=hh,
                                   output_final_state=True, cu_seqlens=cu_b, backend=backend)
        g2 = torch.Generator().manual_seed(case["seed"] + 1)
        dout = torch.randn(out.shape, generator=g2).to(out.device, out.dtype)
        dfinal = torch.randn(final.shape, generator=g2).to(final.device, final.dtype)
        inputs = [t for t in (xx, ww, bb, hh) if t is not None]
        runs.append((out, final, torch.autograd.grad((out * dout).sum() + (final * dfinal).sum(), inputs)))
    tol = TOL[dtype]
    assert_rel(runs[0][0], runs[1][0], tol, "output")
    assert_rel(runs[0][1], runs[1][1], tol, "final state")
    names = [n for n, t in zip(("x", "weight", "bias", "initial_state"), fused, strict=True) if t is not None]
    for name, a, ref in zip(names, runs[0][2], runs[1][2], strict=True):
        assert_rel(a, ref, tol, f"d{name}")


def _conv1d_form(x, weight, bias, activation, state):
    """The conv as ``F.conv1d`` over the state-prefixed input in the [B, D, T] layout, differentiated by
    autograd: the oracle of the reference's hand-written backward. An empty sequence passes its state through."""
    if x.shape[1] == 0:  # F.conv1d refuses inputs shorter than the kernel
        return x, state
    xs = torch.cat([state, x.transpose(1, 2)], 2)
    out = torch.nn.functional.conv1d(xs, weight.unsqueeze(1), bias, groups=weight.shape[0]).transpose(1, 2)
    out = torch.nn.functional.silu(out) if activation == "silu" else out
    return out, xs[:, :, xs.shape[2] - (weight.shape[1] - 1) :]


@given(case=conv_cases())
def test_reference_gradients_match_conv1d_form(case):
    """The reference's backward (dx, dweight, dbias, d initial_state, through the output and the final state)
    against autograd through ``F.conv1d`` in float64, dense and packed (each sequence on its own)."""
    g = torch.Generator().manual_seed(case["seed"])
    B, T, D, W = case["batch"], case["T"], case["D"], case["W"]
    lengths = case["lengths"] or [T] * B
    cu = None if case["lengths"] is None else torch.tensor([0, *lengths]).cumsum(0)
    n = B if cu is None else len(lengths)
    f64 = {"generator": g, "dtype": torch.float64}
    leaves = [torch.randn(B, T, D, **f64), torch.randn(D, W, **f64), torch.randn(D, **f64) if case["bias"] else None,
              torch.randn(n, D, W - 1, **f64) if case["state"] else None]
    x, w, b, h0 = [None if t is None else t.requires_grad_() for t in leaves]
    out, final = causal_conv1d(x, w, b, activation=case["activation"], initial_state=h0, output_final_state=True,
                               cu_seqlens=cu, backend="reference")
    h = torch.zeros(n, D, W - 1, dtype=torch.float64) if h0 is None else h0
    if cu is None:
        want, want_final = _conv1d_form(x, w, b, case["activation"], h)
    else:
        bounds = cu.tolist()
        pieces = [_conv1d_form(x[:, s:e], w, b, case["activation"], h[i : i + 1])
                  for i, (s, e) in enumerate(itertools.pairwise(bounds))]
        want, want_final = torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces])
    assert_rel(out, want, 1e-12, "output")
    assert_rel(final, want_final, 1e-12, "final state")
    dout, dfinal = torch.randn(out.shape, **f64), torch.randn(final.shape, **f64)
    inputs = [t for t in (x, w, b, h0) if t is not None]
    got = torch.autograd.grad((out * dout).sum() + (final * dfinal).sum(), inputs)
    ref = torch.autograd.grad((want * dout).sum() + (want_final * dfinal).sum(), inputs)
    names = [name for name, t in zip(("x", "weight", "bias", "initial_state"), (x, w, b, h0)) if t is not None]
    for name, a, r in zip(names, got, ref, strict=True):
        assert_rel(a, r, 1e-12, f"d{name}")


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("T, W", [(7, 4), (2, 4), (5, 1)])
def test_reference_backward_gradcheck(activation, T, W):
    """Finite differences of the reference in float64, output and final state (T < W-1: the final state
    still holds initial-state rows)."""
    g = torch.Generator().manual_seed(T * 10 + W)
    args = [torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
            for shape in ((2, T, 3), (3, W), (3,), (2, 3, W - 1))]

    def conv(x, w, b, h):
        return causal_conv1d(x, w, b, activation=activation, initial_state=h, output_final_state=True,
                             backend="reference")

    assert torch.autograd.gradcheck(conv, args)
