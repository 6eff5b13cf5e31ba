"""DeltaNet behind the Mixer interface: state across splits, decoding, padding, packing, backends."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seqmix.archs import DeltaNet, Mixer, build_mixer
from tests.helpers import DEVICE, TOL, assert_rel

BACKENDS = ["reference", "triton"]
HIDDEN, HEADS = 32, 2


def _layer(backend, seed=0, **kw):
    torch.manual_seed(seed)
    return build_mixer("deltanet", hidden_size=HIDDEN, num_heads=HEADS, backend=backend, **kw).to(DEVICE)


def _x(B, T, seed=1):
    return torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@given(cuts=st.lists(st.integers(1, 79), max_size=4, unique=True), conv=st.booleans())
def test_pieces_with_state_equal_one_call(backend, cuts, conv):
    layer = _layer(backend, use_short_conv=conv)
    x = _x(2, 80)
    with torch.no_grad():
        full, full_state = layer(x, layer.init_state(2))
        state, pieces = layer.init_state(2), []
        bounds = [0, *sorted(cuts), 80]
        for s, e in zip(bounds[:-1], bounds[1:]):
            y, state = layer(x[:, s:e], state)
            pieces.append(y)
    assert_rel(torch.cat(pieces, 1), full, TOL[torch.float32], "output")
    for name in full_state:
        assert_rel(state[name], full_state[name], TOL[torch.float32], f"state {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_token_by_token_equals_training_call(backend):
    layer = _layer(backend)
    x = _x(2, 40)
    with torch.no_grad():
        full, _ = layer(x)
        y, state = layer(x[:, :30], layer.init_state(2))
        steps = [y]
        for t in range(30, 40):
            y, state = layer(x[:, t : t + 1], state)
            steps.append(y)
    assert_rel(torch.cat(steps, 1), full, TOL[torch.float32], "decoded output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padding_and_packing_equal_separate_calls(backend):
    layer = _layer(backend)
    lengths = [30, 12, 21]
    xs = [_x(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    with torch.no_grad():
        separate = [layer(x, layer.init_state(1)) for x in xs]
        T = max(lengths)
        padded = torch.zeros(3, T, HIDDEN, device=DEVICE)
        mask = torch.zeros(3, T, dtype=torch.long, device=DEVICE)
        for i, (x, n) in enumerate(zip(xs, lengths)):
            padded[i, T - n :] = x[0]
            mask[i, T - n :] = 1
        y_pad, s_pad = layer(padded, layer.init_state(3), attention_mask=mask)
        cu = torch.tensor([0, 30, 42, 63], dtype=torch.int32, device=DEVICE)
        y_packed, s_packed = layer(torch.cat(xs, 1), layer.init_state(3), cu_seqlens=cu)
    assert not y_pad[mask == 0].any(), "padded positions must be zero"
    tol = TOL[torch.float32]
    for i, ((y, s), n) in enumerate(zip(separate, lengths)):
        assert_rel(y_pad[i, T - n :], y[0], tol, f"left-padded output of sequence {i}")
        assert_rel(y_packed[0, int(cu[i]) : int(cu[i + 1])], y[0], tol, f"packed output of sequence {i}")
        for name in s:
            assert_rel(s_pad[name][i], s[name][0], tol, f"left-padded state {name} of sequence {i}")
            assert_rel(s_packed[name][i], s[name][0], tol, f"packed state {name} of sequence {i}")


def test_triton_layer_matches_reference_layer_with_gradients():
    layers = {b: _layer(b, seed=3) for b in BACKENDS}
    x = _x(2, 70)
    outs, grads = {}, {}
    for b, layer in layers.items():
        xb = x.clone().requires_grad_()
        y, _ = layer(xb)
        y.square().sum().backward()
        outs[b] = y
        grads[b] = [xb.grad] + [p.grad for p in layer.parameters()]
    tol = TOL[torch.float32]
    assert_rel(outs["triton"], outs["reference"], tol, "output")
    names = ["x"] + [n for n, _ in layers["triton"].named_parameters()]
    for name, a, b in zip(names, grads["triton"], grads["reference"]):
        assert_rel(a, b, tol, f"grad of {name}")


def test_interface_errors():
    layer = _layer("reference")
    assert isinstance(layer, Mixer) and isinstance(layer, DeltaNet)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, hidden_size=32\]"):
        layer(torch.randn(2, 5, 16, device=DEVICE))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        layer(_x(2, 5), attention_mask=torch.ones(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="not both"):
        layer(_x(1, 5), attention_mask=torch.ones(1, 5, device=DEVICE), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="unknown mixer 'mamba9'"):
        build_mixer("mamba9", hidden_size=8)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DeltaNet(hidden_size=30, num_heads=4)
