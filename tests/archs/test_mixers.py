"""Every registered mixer keeps the Mixer contract (tests/archs/contract.py), with each kernel backend."""

import functools
import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from seqmix.archs import MIXERS, Mixer, build_mixer
from tests.archs import contract
from tests.helpers import DEVICE, ON_GPU, TOL, assert_rel

HIDDEN = 32
# A small config per registered mixer; a mixer registered without one fails test_every_mixer_has_a_config.
SMALL_CONFIGS = {
    "attention": {"hidden_size": HIDDEN, "num_heads": 2},
    "deltanet": {"hidden_size": HIDDEN, "num_heads": 2},
    "lightconv": {"hidden_size": HIDDEN, "num_heads": 1, "kernel_size": 3},
    "dynamicconv": {"hidden_size": HIDDEN, "num_heads": 1, "kernel_size": 3},
    "shortconv": {"hidden_size": HIDDEN, "conv_size": 4},
    "mamba": {"hidden_size": HIDDEN, "d_state": 4, "expand": 1},
    "mamba2": {"hidden_size": HIDDEN, "head_dim": 32, "d_state": 8, "expand": 1},
    "gated_deltanet": {"hidden_size": HIDDEN, "num_heads": 2},
    "gla": {"hidden_size": HIDDEN, "num_heads": 2},
    # entropy boundaries: deterministic in training calls too (the contract compares them with decoding);
    # every mode is run through the contract in tests/archs/test_hourglass.py.
    "hourglass": {"hidden_size": HIDDEN, "num_heads": 2, "layers": ["attention"], "boundary": "entropy"},
    # init_std=0: these layers are in training mode, where the latent's noise is drawn i.i.d. per call;
    # tests/archs/test_recurrent_depth.py runs the contract with the positional noise of evaluation.
    "recurrent_depth": {"hidden_size": HIDDEN, "num_heads": 2, "core": ["attention"], "mean_steps": 2,
                        "backprop_steps": 1, "init_std": 0.0},
}
# Each mixer with each backend it takes, except those that need a package this machine lacks.
CASES = [(name, backend) for name in sorted(SMALL_CONFIGS) for backend in MIXERS[name].backends
         if backend != "flash_attn" or importlib.util.find_spec("flash_attn")]
# The contract through Triton's interpreter is in the slow tier (minutes on a CPU); each family's layer-level
# Triton parity (tests/archs/test_<family>.py) stays in the quick tier.
TIERED_CASES = [pytest.param(name, backend, marks=pytest.mark.slow) if backend == "triton" else (name, backend)
                for name, backend in CASES]


def _mixer(name, backend, seed=0):
    torch.manual_seed(seed)
    return build_mixer(name, **SMALL_CONFIGS[name], backend=backend).to(DEVICE)


def _x(B, T, seed=1):
    return torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_every_mixer_has_a_config():
    assert set(MIXERS) == set(SMALL_CONFIGS)
    for name in MIXERS:
        assert isinstance(_mixer(name, "reference"), Mixer)


@functools.cache
def _whole_sequence(name, backend):
    """The layer, its input and its one call: the same for every set of cuts Hypothesis draws, so it runs once
    (in Triton's interpreter that call was a third of the test's time)."""
    layer, x = _mixer(name, backend), _x(2, 80)
    with torch.no_grad():
        return layer, x, layer(x, layer.init_state(2))


# Through Triton's interpreter a drawn set of cuts takes seconds (up to 10 s: each piece's kernels are interpreted
# op by op, the recurrent ones token by token), so there the contract draws at most 8 of them (the other backends
# draw the profile's: 20 in CI); on a GPU it draws the profile's.
INTERPRETED_CUTS = settings().max_examples if ON_GPU else min(8, settings().max_examples)


def _pieces_equal_one_call(name, backend, cuts):
    layer, x, one_call = _whole_sequence(name, backend)
    contract.pieces_equal_one_call(layer, x, cuts, TOL[torch.float32], one_call)


@pytest.mark.parametrize("name, backend", [case for case in CASES if case[1] != "triton"])
@given(cuts=st.lists(st.integers(1, 79), max_size=4))
def test_pieces_with_state_equal_one_call(name, backend, cuts):
    _pieces_equal_one_call(name, backend, cuts)


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, backend in CASES if backend == "triton"])
@settings(max_examples=INTERPRETED_CUTS)
@given(cuts=st.lists(st.integers(1, 79), max_size=4))
def test_pieces_with_state_equal_one_call_in_triton(name, cuts):
    _pieces_equal_one_call(name, "triton", cuts)


@pytest.mark.parametrize("name, backend", TIERED_CASES)
def test_decoding_token_by_token_equals_training_call(name, backend):
    contract.decoding_equals_training_call(_mixer(name, backend), _x(2, 40), 30, TOL[torch.float32])


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_decoding_follows_parameters_changed_in_place(name):
    """Decoding steps keep what they make from the parameters between tokens (Mixer._decoding_constant): a
    change in place (an optimizer's step, load_state_dict) must reach the next token."""
    layer, x = _mixer(name, "reference"), _x(1, 6)
    noise = torch.Generator().manual_seed(2)
    with torch.no_grad():
        state = layer.init_state(1)
        for t in range(3):
            _, state = layer(x[:, t : t + 1], state)
        before, _ = layer(x, layer.init_state(1))
        for p in layer.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=noise).to(p))
        expected, _ = layer(x, layer.init_state(1))
        assert (expected - before).norm() > 0.05 * before.norm()  # the change shows in the outputs
        state, outs = layer.init_state(1), []
        for t in range(6):
            y, state = layer(x[:, t : t + 1], state)
            outs.append(y)
    assert_rel(torch.cat(outs, 1), expected, TOL[torch.float32], "outputs after the change")


@pytest.mark.parametrize("name, backend", TIERED_CASES)
def test_left_padding_and_packing_equal_separate_calls(name, backend):
    xs = [_x(1, t, seed=10 + i) for i, t in enumerate([30, 12, 21])]
    contract.padding_and_packing_equal_separate_calls(_mixer(name, backend), xs, TOL[torch.float32])


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_reference_backend_launches_no_triton_kernel(name, monkeypatch):
    """backend="reference" is the oracle of the layer tests: every op inside, short convs included, must take it."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} with backend='reference' launched a Triton kernel")

    for kernel_type in (JITFunction, InterpretedFunction):
        monkeypatch.setattr(kernel_type, "run", refuse)
    layer, x = _mixer(name, "reference"), _x(2, 20).requires_grad_()
    y, state = layer(x, layer.init_state(2))
    layer(x[:, :1], state)
    y.sum().backward()


def test_interface_errors():
    layer = _mixer("deltanet", "reference")
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, hidden_size=32\]"):
        layer(torch.randn(2, 5, 16, device=DEVICE))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        layer(_x(2, 5), attention_mask=torch.ones(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="not both"):
        layer(_x(1, 5), attention_mask=torch.ones(1, 5, device=DEVICE), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="unknown mixer 'mamba9'"):
        build_mixer("mamba9", hidden_size=8)


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_a_state_for_other_sequences_is_refused_in_the_layers_terms(name):
    """A state for 2 sequences on 3 is named as the state's batch against what the call continues (x's batch,
    the mask's, or the packed sequences), whatever the state holds (caches, nested layers' states)."""
    layer = _mixer(name, "reference")
    state = layer.init_state(2)
    with pytest.raises(ValueError, match=r"state\['.+'\] holds 2 sequence\(s\) .* continues 3: x's batch of 3"):
        layer(_x(3, 4), state)
    with pytest.raises(ValueError, match=r"holds 2 sequence\(s\) .* continues 3: attention_mask's batch of 3"):
        layer(_x(3, 4), state, attention_mask=torch.ones(3, 4, device=DEVICE))
    cu_seqlens = torch.tensor([0, 1, 3, 4], device=DEVICE)
    with pytest.raises(ValueError, match=r"holds 2 sequence\(s\) .* continues 3: len\(cu_seqlens\) - 1 = 3"):
        layer(_x(1, 4), state, cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="state must be a dict of tensors"):
        layer(_x(2, 4), [state])


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_a_call_without_tokens_returns_an_empty_output_and_the_state_unchanged(name):
    """T = 0 and an empty batch (B = 0), training and with a state: an empty output in x's dtype, the state as
    it was (before, GLA and Mamba-2 failed to reshape, attention and recurrent depth with a state too)."""
    layer = _mixer(name, "reference")
    for B, T in ((2, 0), (0, 5)):
        x = _x(B, T)
        y, none = layer(x)
        assert y.shape == (B, T, HIDDEN) and y.dtype == x.dtype and none is None
        state = layer.init_state(B)
        y, after = layer(x, state)
        assert y.shape == (B, T, HIDDEN) and after is state
        with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\]"):
            layer(x, attention_mask=torch.ones(B, T + 1, device=DEVICE))
