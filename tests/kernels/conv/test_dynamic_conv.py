"""LightConv and DynamicConv: the contract by hand (edges, T < K), the DropConnect mask, packed
sequences, Triton against the float64 reference (outputs and gradients), bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.kernels import dynamic_conv, light_conv
from seqmix.kernels.conv.dynamic_reference import dropconnect_keep, dropconnect_threshold
from tests.helpers import DEVICE, KERNEL_DTYPES, ON_GPU, TOL, assert_rel
from tests.kernels.conv.strategies import batch_layout


def _by_hand(x, w, P):
    """out[b, t, c] = sum_j w[b, t, h(c), j] * x[b, t + j - P, c], taps outside [0, T) reading zero."""
    T, C = x.shape[1:]
    H, K = w.shape[-2:]
    R = C // H
    out = torch.zeros_like(x)
    for t in range(T):
        for j in range(K):
            s = t + j - P
            if 0 <= s < T:
                out[:, t] += w[:, t, :, j].repeat_interleave(R, -1) * x[:, s]
    return out


@given(T=st.integers(1, 9), K=st.integers(1, 7), H=st.integers(1, 3), padding=st.sampled_from(["causal", "same"]),
       dynamic=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_the_contract(T, K, H, padding, dynamic, seed):
    """Also when T < K: the softmax still spans all K taps, the taps off the sequence read zero."""
    if padding == "same" and K % 2 == 0:
        K += 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, 2 * H, generator=g, dtype=torch.float64)
    logits = torch.randn(*((2, T) if dynamic else ()), H, K, generator=g, dtype=torch.float64)
    op = dynamic_conv if dynamic else light_conv
    out = op(x, logits, padding=padding)
    w = torch.softmax(logits, -1).expand(2, T, H, K)
    assert_rel(out, _by_hand(x, w, K - 1 if padding == "causal" else K // 2), 1e-12, "output")
    raw = op(x, logits, padding=padding, weight_softmax=False)
    assert_rel(raw, _by_hand(x, logits.expand(2, T, H, K), K - 1 if padding == "causal" else K // 2), 1e-12, "raw")


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 12), K=st.integers(1, 7), H=st.integers(1, 3), padding=st.sampled_from(["causal", "same"]),
       dynamic=st.booleans(), softmax=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_reference_gradients_match_the_contract(T, K, H, padding, dynamic, softmax, seed):
    """The reference's hand-written backward: dx and dweight equal autograd's through the by-hand sum (float64)."""
    if padding == "same" and K % 2 == 0:
        K += 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, 3 * H, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(*((2, T) if dynamic else ()), H, K, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, T, 3 * H, generator=g, dtype=torch.float64)
    op = dynamic_conv if dynamic else light_conv
    got = torch.autograd.grad(op(x, logits, padding=padding, weight_softmax=softmax, backend="reference"), (x, logits),
                              dout)
    w = (torch.softmax(logits, -1) if softmax else logits).expand(2, T, H, K)
    want = torch.autograd.grad(_by_hand(x, w, K - 1 if padding == "causal" else K // 2), (x, logits), dout)
    assert_rel(got[0], want[0], 1e-12, "dx")
    assert_rel(got[1], want[1], 1e-12, "dweight")


def test_dropconnect_applies_the_seeded_mask_after_the_softmax():
    g = torch.Generator().manual_seed(0)
    x, logits = torch.randn(2, 6, 4, generator=g, dtype=torch.float64), torch.randn(2, 6, 2, 3, generator=g).double()
    out = dynamic_conv(x, logits, dropconnect=0.4, seed=11)
    keep = dropconnect_keep(11, torch.arange(logits.numel()).view(logits.shape), dropconnect_threshold(0.4))
    assert 0 < keep.sum() < keep.numel()
    w = torch.softmax(logits, -1) * keep / 0.6
    assert_rel(out, _by_hand(x, w, 2), 1e-12, "output with DropConnect")


def test_dropconnect_mask_statistics():
    """The hash keeps 1-p of the taps, and two seeds give (nearly) independent masks."""
    index = torch.arange(1 << 20)
    for p in (0.1, 0.5):
        a = dropconnect_keep(1, index, dropconnect_threshold(p))
        b = dropconnect_keep(2, index, dropconnect_threshold(p))
        assert abs(a.double().mean().item() - (1 - p)) < 3e-3
        assert abs((a & b).double().mean().item() - (1 - p) ** 2) < 3e-3
    high = dropconnect_keep(5, index + (3 << 32), dropconnect_threshold(0.5))
    assert (high != dropconnect_keep(5, index, dropconnect_threshold(0.5))).double().mean() > 0.4


def test_unseeded_dropconnect_follows_torch_manual_seed():
    x, w = torch.randn(1, 8, 4), torch.randn(2, 3)
    torch.manual_seed(3)
    a = light_conv(x, w, dropconnect=0.5)
    torch.manual_seed(3)
    b = light_conv(x, w, dropconnect=0.5)
    torch.testing.assert_close(a, b)


def test_packed_sequences_equal_separate_calls():
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 5, 5, 14, 16])
    x, w = torch.randn(1, 16, 6, generator=g), torch.randn(1, 16, 3, 5, generator=g)
    for padding in ("causal", "same"):
        out = dynamic_conv(x, w, padding=padding, cu_seqlens=cu)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            torch.testing.assert_close(out[:, s:e], dynamic_conv(x[:, s:e], w[:, s:e], padding=padding))


def test_empty_sequence():
    x = torch.randn(2, 0, 4, requires_grad=True)
    out = light_conv(x, torch.randn(2, 3))
    assert out.shape == (2, 0, 4)


@pytest.mark.parametrize(
    "op, kwargs, match",
    [
        (light_conv, {"x": torch.randn(2, 5)}, r"x must have shape \[B, T, C\]"),
        (light_conv, {"weight": torch.randn(3, 3)}, "C=8 must be divisible by weight's heads H=3"),
        (light_conv, {"weight": torch.randn(2, 2, 3)}, r"weight must have shape \[H, K\]"),
        (light_conv, {"weight": torch.randn(2, 0)}, "K >= 1"),
        (light_conv, {"weight": torch.randn(2, 4), "padding": "same"}, "padding='same' needs an odd kernel size"),
        (light_conv, {"padding": "left"}, "padding must be one of"),
        (light_conv, {"dropconnect": 1.0}, r"dropconnect must be in \[0, 1\)"),
        (light_conv, {"dropconnect": 0.1, "seed": 1.5}, "seed must be an int"),
        (dynamic_conv, {"weight": torch.randn(2, 3)}, r"weight must have shape \[B, T, H, K\]"),
        (dynamic_conv, {"weight": torch.randn(2, 4, 2, 3)}, r"weight must have shape \[B, T, H, K\]"),
        (dynamic_conv, {"weight": torch.randn(2, 5, 3, 3)}, "divisible by weight's heads H=3"),
        (dynamic_conv, {"cu_seqlens": torch.tensor([0, 5])}, "packed as"),
    ],
)
def test_bad_input(op, kwargs, match):
    args = {"x": torch.randn(2, 5, 8), "weight": torch.randn(2, 5, 2, 3) if op is dynamic_conv else torch.randn(2, 3)}
    args.update(kwargs)
    x, weight = args.pop("x"), args.pop("weight")
    with pytest.raises(ValueError, match=match):
        op(x, weight, **args)


# Channels per head: 1 and odd sizes cover the masked channel blocks; above 64 the head takes two blocks.
HEAD_CHANNELS = [8, 64, 96] if ON_GPU else [1, 3, 20, 70]
# Kernel sizes on the GPU: the paper's 3 to 31, and the edges.
TAPS = [1, 2, 3, 7, 15, 31]


@st.composite
def conv_cases(draw):
    batch, T, lengths = draw(batch_layout(50, 3, 70))
    padding = draw(st.sampled_from(["causal", "same"]))
    K = draw(st.sampled_from(TAPS) if ON_GPU else st.integers(1, 9))
    return {
        "batch": batch, "T": T, "lengths": lengths, "H": draw(st.integers(1, 3)), "R": draw(st.sampled_from(HEAD_CHANNELS)),
        "K": K + (padding == "same" and K % 2 == 0), "padding": padding, "dynamic": draw(st.booleans()),
        "softmax": draw(st.booleans()), "dropconnect": draw(st.sampled_from([0.0, 0.3])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@settings(max_examples=15)
@given(case=conv_cases())
def test_triton_matches_reference(case, dtype):
    """Outputs and the gradients of x and the weights (through the softmax and DropConnect)."""
    g = torch.Generator().manual_seed(case["seed"])
    B, T, H, R, K = case["batch"], case["T"], case["H"], case["R"], case["K"]
    cu = None if case["lengths"] is None else torch.tensor([0, *case["lengths"]]).cumsum(0)
    x = torch.randn(B, T, H * R, generator=g)
    w = torch.randn(*((B, T) if case["dynamic"] else ()), H, K, generator=g)
    op = dynamic_conv if case["dynamic"] else light_conv
    runs = []
    for (xx, ww), backend in (((x.to(DEVICE, dtype), w.to(DEVICE, dtype)), "triton"), ((x.double(), w.double()), "reference")):
        xx, ww = xx.requires_grad_(), ww.requires_grad_()
        out = op(xx, ww, padding=case["padding"], weight_softmax=case["softmax"], dropconnect=case["dropconnect"],
                 seed=case["seed"], cu_seqlens=None if cu is None else cu.to(xx.device), backend=backend)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(case["seed"] + 1)).to(out)
        runs.append((out, *torch.autograd.grad((out * dout).sum(), (xx, ww))))
    tol = TOL[dtype]
    for name, a, ref in zip(("output", "dx", "dweight"), *runs, strict=True):
        assert_rel(a, ref, tol, name)
