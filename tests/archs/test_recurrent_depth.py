"""The recurrent-depth layer: the Mixer contract with the latent's noise on, fused vs reference, truncated
backpropagation, adaptive exit, the bounded state, warm start, the depth distribution, the LM wiring and
bad input. (tests/archs/test_mixers.py runs the contract in training mode, with init_std=0.)"""

import math

import pytest
import torch

from seqmix.archs import RecurrentDepth, build_mixer
from seqmix.archs.lm import LanguageModel, LMConfig
from seqmix.archs.recurrent_depth import TRUNCATION, positional_noise, sample_depth
from tests.archs import contract
from tests.helpers import DEVICE, TOL, assert_rel, require_cpu_kernels, step_in_python

HIDDEN = 32


def _layer(backend="reference", seed=0, **options):
    torch.manual_seed(seed)
    config = {"hidden_size": HIDDEN, "num_heads": 2, "core": ["attention", "deltanet"], "mean_steps": 3,
              "backprop_steps": 2, **options}
    layer = build_mixer("recurrent_depth", **config, backend=backend)
    # Norm weights away from 1: the output is the last sandwich norm's, and with unit weights a squared-sum
    # loss of it would be a constant (its gradients pure rounding noise).
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return layer.to(DEVICE).eval()


def _x(B, T, seed=1):
    return torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _grads(layer, x, **kw):
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y, _ = layer(x, **kw)
    y.square().sum().backward()
    return y, {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


def test_contract_with_the_latent_noise():
    layer = _layer()
    assert layer.init_std > 0
    contract.pieces_equal_one_call(layer, _x(2, 24), [5, 6, 17], TOL[torch.float32])
    contract.decoding_equals_training_call(layer, _x(2, 16), 11, TOL[torch.float32])
    contract.padding_and_packing_equal_separate_calls(layer, [_x(1, t, seed=10 + t) for t in (9, 4, 7)],
                                                      TOL[torch.float32])


def test_fused_matches_reference():
    """Split adapter and fused norms (Triton, in the interpreter here) against the concatenated adapter and
    reference norms, r = 3 with the first iteration under no_grad: outputs and every gradient."""
    contract.fused_matches_reference(
        lambda backend: _layer(backend, core=["attention"]), _x(2, 13), TOL[torch.float32],
        expected_params=["adapter.weight", "core.0.norm_mixer_out", "core.0.mlp.down.weight"])


def test_truncated_backprop_equals_restarting_from_the_detached_latent():
    """r = 4, k = 2: the same as 2 iterations without gradient, then 2 with it from that latent."""
    layer, x = _layer(), _x(2, 9)
    y, grads = _grads(layer, x, num_steps=4, backprop_steps=2)
    with torch.no_grad():
        s2, _ = layer(x, num_steps=2)
    y_restart, grads_restart = _grads(layer, x, num_steps=2, backprop_steps=2, initial_latent=s2)
    assert_rel(y, y_restart, 1e-6, "output")
    for name, g in grads.items():
        assert g is not None and g.abs().sum() > 0, f"{name} got no gradient"
        assert_rel(g, grads_restart[name], 1e-5, f"grad of {name}")


def test_truncated_backprop_gives_the_early_iterations_nothing():
    layer, x = _layer(), _x(2, 9)
    s0 = torch.randn(2, 9, HIDDEN, device=DEVICE, requires_grad=True)
    y, _ = layer(x, num_steps=4, backprop_steps=2, initial_latent=s0)
    y.sum().backward()
    assert s0.grad is None, "the start latent is touched only by the no_grad iterations"
    y, _ = layer(x, num_steps=2, backprop_steps=2, initial_latent=s0)
    y.sum().backward()
    assert s0.grad is not None and s0.grad.abs().sum() > 0, "with k = r the start latent gets a gradient"


def test_backprop_through_all_iterations_when_k_equals_r():
    """k = r equals full backpropagation: the same iterations as r chained one-step calls."""
    layer, x = _layer(), _x(2, 9)
    y, grads = _grads(layer, x, num_steps=3, backprop_steps=3)
    xc = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    s, _ = layer(xc, num_steps=1)
    for _ in range(2):
        s, _ = layer(xc, num_steps=1, initial_latent=s)
    s.square().sum().backward()
    chained = {"x": xc.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    assert_rel(y, s, 1e-6, "output")
    for name, g in grads.items():
        assert_rel(g, chained[name], 1e-5, f"grad of {name}")


def test_adaptive_exit_never_exceeds_the_maximum_and_is_fixed_r_at_threshold_zero():
    layer, x = _layer(), _x(2, 11)
    with torch.no_grad():
        fixed, _ = layer(x, num_steps=5)
        at_zero, _ = layer(x, num_steps=5, exit_threshold=0.0, exit_criterion="latent")
        assert layer.last_exit_steps.eq(5).all()
        assert at_zero.equal(fixed)
        # Every token meets a huge threshold at its second iteration: the result of r = 2.
        early, _ = layer(x, num_steps=5, exit_threshold=1e9, exit_criterion="latent")
        assert layer.last_exit_steps.eq(2).all()
        two, _ = layer(x, num_steps=2)
        assert_rel(early, two, 1e-6, "exit at the second iteration")
        layer(x, num_steps=5, exit_threshold=0.05, exit_criterion="latent")
        assert ((layer.last_exit_steps >= 2) & (layer.last_exit_steps <= 5)).all()


def test_adaptive_exit_in_the_lm_by_kl():
    torch.manual_seed(0)
    config = LMConfig(vocab_size=300, hidden_size=HIDDEN, num_heads=2, layers=["attention", "recurrent_depth", "attention"],
                      mixer_options={"recurrent_depth": {"core": ["attention"], "mean_steps": 4}})
    model = LanguageModel(config).to(DEVICE).eval()
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        fixed, _ = model(tokens, num_steps=6)
        assert model(tokens, num_steps=6, exit_threshold=0.0)[0].equal(fixed)
        model(tokens, num_steps=6, exit_threshold=1e-2)
    steps = model.blocks[1].mixer.last_exit_steps
    assert steps.shape == (2, 10) and ((steps >= 2) & (steps <= 6)).all()
    out = model.generate(tokens, 3, temperature=0.0, num_steps=6, exit_threshold=1e-2)
    assert out.shape == (2, 13)


def test_bounded_state_is_the_same_size_at_any_depth():
    exact, bounded = _layer(), _layer(state_mode="bounded")
    assert len(bounded.init_state(2, num_steps=2)) == len(bounded.init_state(2, num_steps=8))
    assert len(exact.init_state(2, num_steps=8)) > len(exact.init_state(2, num_steps=2))
    x = _x(2, 14)
    with torch.no_grad():
        # one iteration: nothing to share, the two modes agree exactly
        a = contract_outputs(exact, x, 1)
        b = contract_outputs(bounded, x, 1)
        assert_rel(b, a, 1e-6, "bounded vs exact at r = 1")
        # at r = 3 the bounded decoding is an approximation of the exact one, but stays finite
        c = contract_outputs(bounded, x, 3)
        assert torch.isfinite(c).all() and not torch.allclose(c, contract_outputs(exact, x, 3))
        # and with no state (training) the modes are the same computation
        assert bounded(x, num_steps=3)[0].equal(exact(x, num_steps=3)[0])


def contract_outputs(layer, x, r):
    """Prefill 8 tokens, then decode the rest one at a time, at depth r."""
    y, state = layer(x[:, :8], layer.init_state(x.shape[0], num_steps=r), num_steps=r)
    outs = [y]
    for t in range(8, x.shape[1]):
        y, state = layer(x[:, t : t + 1], state, num_steps=r)
        outs.append(y)
    return torch.cat(outs, 1)


def test_warm_start_continues_from_the_previous_tokens_latent():
    cold, warm = _layer(), _layer(warm_start=True)
    x = _x(2, 6)
    with torch.no_grad():
        y_cold, s_cold = cold(x[:, :5], cold.init_state(2))
        y_warm, s_warm = warm(x[:, :5], warm.init_state(2))
        assert y_warm.equal(y_cold), "a prefill starts from the noise"
        assert s_warm["latent"].equal(y_warm[:, -1])
        next_warm, _ = warm(x[:, 5:], s_warm)
        next_cold, _ = cold(x[:, 5:], s_cold)
        # the same token started from the previous final latent instead of the noise
        start = s_warm["latent"][:, None]
        by_hand, _ = cold(x[:, 5:], s_cold, initial_latent=start)
    assert_rel(next_warm, by_hand, 1e-6, "warm-started token")
    assert not torch.allclose(next_warm, next_cold)


def test_depth_distribution():
    g = torch.Generator().manual_seed(0)
    draws = [sample_depth(32, 8, g) for _ in range(4000)]
    r = torch.tensor([d[0] for d in draws], dtype=torch.float64)
    assert r.min() >= 1 and abs(r.mean().item() - 32) < 1.5, f"mean depth {r.mean().item():.2f}, want 32"
    assert all(k == min(8, n) for n, k in draws)
    assert sample_depth(1, 8, g) == (1, 1)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [sample_depth(16, 4, g1) for _ in range(5)] == [sample_depth(16, 4, g2) for _ in range(5)]


def test_positional_noise_is_a_truncated_normal_of_position_and_seed():
    positions = torch.arange(2048)
    noise = positional_noise(positions, 64, 0.5, seed=7, dtype=torch.float64)
    assert noise.equal(positional_noise(positions, 64, 0.5, seed=7, dtype=torch.float64))
    assert not noise.equal(positional_noise(positions, 64, 0.5, seed=8, dtype=torch.float64))
    assert noise[100:110].equal(positional_noise(positions[100:110], 64, 0.5, seed=7, dtype=torch.float64))
    assert noise.abs().max() <= TRUNCATION * 0.5
    # the standard deviation of a standard normal truncated at +-3 is 0.98658
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() / 0.5 - 0.98658) < 0.01


def test_the_coda_sees_the_final_latent():
    torch.manual_seed(0)
    config = LMConfig(vocab_size=300, hidden_size=HIDDEN, num_heads=2,
                      layers=["attention", "recurrent_depth", "attention"],
                      mixer_options={"recurrent_depth": {"core": ["attention"], "mean_steps": 2}})
    model = LanguageModel(config).to(DEVICE).eval()
    assert not hasattr(model.blocks[1], "mlp"), "the recurrent block has no MLP of its own (its core has them)"
    seen = {}
    model.blocks[1].mixer.register_forward_hook(lambda m, args, out: seen.update(latent=out[0]))
    model.blocks[2].register_forward_pre_hook(lambda m, args: seen.update(coda_input=args[0]))
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 7)).to(DEVICE))
    assert seen["coda_input"].equal(seen["latent"])
    norms = [p for n, p in model.named_parameters() if ".core." in n and "norm" in n]
    assert len(norms) == 4 and all(getattr(p, "no_weight_decay", False) for p in norms)
    with pytest.raises(ValueError, match="no layer iterates"):
        LanguageModel(LMConfig(vocab_size=300, hidden_size=HIDDEN, num_heads=2, layers=["attention"]))(
            torch.zeros(1, 3, dtype=torch.int64), num_steps=2)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"core": "attention"}, "core must be a non-empty list of registered mixer names"),
        ({"core": []}, "core must be a non-empty list"),
        ({"core": ["attention", "mamba9"]}, "core: 'mamba9' is not a registered mixer"),
        ({"core": ["recurrent_depth"]}, "cannot iterate another recurrent_depth"),
        ({"core_options": {"gla": {}}}, "core_options names mixer"),
        ({"mean_steps": 0}, "mean_steps must be an integer >= 1"),
        ({"backprop_steps": 0}, "backprop_steps must be an integer >= 1"),
        ({"init_std": -1.0}, "init_std must be a finite number >= 0"),
        ({"state_mode": "shared"}, "state_mode must be one of"),
    ],
)
def test_bad_config(options, match):
    with pytest.raises(ValueError, match=match):
        _layer(**options)


def test_bad_call():
    layer, x = _layer(), _x(1, 4)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        layer(x, num_steps=0)
    with pytest.raises(ValueError, match="backprop_steps must be an integer >= 1"):
        layer(x, backprop_steps=0)
    with pytest.raises(ValueError, match="the state holds 3 iterations"):
        layer(x, layer.init_state(1), num_steps=4)
    with pytest.raises(ValueError, match="exit_threshold must be a finite number >= 0"):
        layer(x, exit_threshold=-1.0, exit_criterion="latent")
    with pytest.raises(ValueError, match="needs readout"):
        layer(x, exit_threshold=0.1)
    with pytest.raises(ValueError, match="initial_latent must have x's shape"):
        layer(x, initial_latent=torch.zeros(1, 3, HIDDEN))
    with pytest.raises(ValueError, match=r"state\['length'\] holds 2 sequence\(s\) .* x's batch of 1"):
        layer(x, layer.init_state(2))
    assert isinstance(layer, RecurrentDepth) and math.isclose(layer.init_std, math.sqrt(2 / (5 * HIDDEN)))


def test_a_decoding_token_traces_as_one_graph():
    """With preallocated attention caches a decoding token (and one iteration) has no host sync and no shape
    change: torch.compile(fullgraph=True) traces it, and the in-place cache decodes as the growing one."""
    torch._dynamo.reset()
    layer, x = _layer(core=["attention"], mean_steps=2), _x(2, 10)
    with torch.no_grad():
        _, grown = layer(x[:, :8], layer.init_state(2))
        _, static = layer(x[:, :8], layer.init_state(2, capacity=10))
        want, want_state = layer(x[:, 8:9], grown)
        got, got_state = torch.compile(layer, fullgraph=True, backend="eager")(x[:, 8:9], static)
        assert_rel(got, want, 1e-6, "compiled in-place decoding")
        for i in range(2):
            for name, value in layer.sequence_state(want_state, i).items():
                assert_rel(layer.sequence_state(got_state, i)[name], value, 1e-6, f"state {name!r} of sequence {i}")
        e_proj = torch.nn.functional.linear(x[:, 9:], layer.adapter.weight[:, HIDDEN:])
        states = layer._layer_states(got_state, 2)[1]
        iteration = torch.compile(layer._iterate, fullgraph=True, backend="eager")
        args = (want[:, :1], e_proj, states, None, "reference")
        assert_rel(iteration(*args)[0], layer._iterate(*args)[0], 1e-6, "one compiled iteration")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoding_sandwich_blocks_after_the_mixer_is_one_cpp_call(dtype, monkeypatch):
    """On CPU tensors a decoding step's sandwich block after its mixer (the mixer output's norm, the MLP between
    its two norms) is one C++ call (step_cpu.sandwich_swiglu_step) per block and iteration, equal to add_rms_norm
    and the SwiGLU module (SEQMIX_BACKEND=reference) to 1e-12 in float64; opcheck of the custom op."""
    from seqmix.kernels import step_cpu
    from seqmix.kernels.backend import recording

    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = _layer(None).to("cpu", dtype)  # two blocks (attention, deltanet), r = 3; CPU tensors on a GPU too
    x = _x(2, 9).to("cpu", dtype)
    with torch.no_grad():
        _, state = layer(x[:, :8], layer.init_state(2))
        with recording() as choices:
            got, got_state = layer(x[:, 8:], state)
        assert [c.backend for c in choices if c.op == "sandwich_swiglu_step"] == ["cpu"] * 6
        monkeypatch.setenv("SEQMIX_BACKEND", "reference")
        want, want_state = layer(x[:, 8:], state)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_rel(got, want, tol, "the decoded latent")
    for name, value in want_state.items():
        assert_rel(got_state[name], value, tol, f"state {name!r}")
    block, g = layer.core[0], torch.Generator().manual_seed(0)
    s, y = (torch.randn(2, 1, HIDDEN, generator=g, dtype=dtype) for _ in range(2))
    weights = [p.detach() for p in (block.norm_mixer_out, block.norm_mlp_in, block.norm_mlp_out)]
    torch.library.opcheck(step_cpu.sandwich_swiglu_step.op, (s, y, *weights, 1e-5, block.mlp.gate_up.weight.detach(),
                                                            block.mlp.down.weight.detach()),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["exact", "bounded"])
@pytest.mark.parametrize("one_call", [True, False], ids=["one C++ call", "bound steps"])
def test_decoding_tokens_take_the_bound_cpp_steps_equal_to_the_iterations(dtype, mode, one_call, monkeypatch):
    """With preallocated attention caches a decoding token's r iterations are the core blocks' C++ steps bound
    once (RecurrentDepth.cpu_decoding_step): one C++ call for all of them where every core mixer's step is a
    LayerCall (step_cpu.recurrent_core), else the blocks' bound steps in Python (here DeltaNet's step wrapped in
    a Python function). The outputs and states equal mix's iterations through the modules (the same calls) bit
    for bit, in both state modes (bounded with the warm start). An LM with the layer binds it for generate; the
    adaptive exit too (the next test)."""
    from seqmix.archs.deltanet import DeltaNet
    from seqmix.kernels import step_cpu

    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the norms' cpu backend (the interpreter's Triton is not bound)
    cores, recurrent_core = [], step_cpu.recurrent_core
    monkeypatch.setattr(step_cpu, "recurrent_core", lambda *args: cores.append(args) or recurrent_core(*args))
    if not one_call:
        step_in_python(monkeypatch, DeltaNet)
    layer = _layer(None, state_mode=mode, warm_start=mode == "bounded").to("cpu", dtype)
    x = _x(2, 8).to("cpu", dtype)

    def decode():
        with torch.no_grad():
            y, state = layer(x[:, :5], layer.init_state(2, capacity=8))
            ys = [y]
            for t in range(5, 8):
                y, state = layer(x[:, t : t + 1], state)
                ys.append(y)
        return torch.cat(ys, 1), state

    got, got_state = decode()
    assert len(cores) == (3 if one_call else 0)  # one per decoded token
    bound_step = RecurrentDepth.cpu_decoding_step
    with torch.no_grad():
        assert layer.cpu_decoding_step(x[:, :1], got_state) is not None
        assert layer.cpu_decoding_step(x[:, :1], got_state, exit_threshold=0.1) is None
    monkeypatch.setattr(RecurrentDepth, "cpu_decoding_step", lambda self, *args, **options: None)
    want, want_state = decode()
    assert torch.equal(got, want)
    assert got_state.keys() == want_state.keys()
    for name, value in want_state.items():
        assert torch.equal(got_state[name], value), f"state {name!r}"
    monkeypatch.setattr(RecurrentDepth, "cpu_decoding_step", bound_step)
    config = LMConfig(vocab_size=300, hidden_size=HIDDEN, num_heads=2, layers=["attention", "recurrent_depth"],
                      mixer_options={"recurrent_depth": {"core": ["attention"], "mean_steps": 2}})
    model = LanguageModel(config).to("cpu", dtype).eval()
    with torch.no_grad():
        _, state = model(torch.tensor([[1, 2, 3]]), model.init_state(1, capacity=6))
        assert model._cpu_decoder(state, model._step_options(None, None, None)) is not None
        assert model._cpu_decoder(state, model._step_options(None, None, 1e-2)) is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["exact", "bounded"])
def test_adaptive_exit_decodes_in_one_cpp_call_equal_to_the_iterations(dtype, mode, monkeypatch):
    """generate's adaptive exit (the KL criterion on the LM's logits) runs inside the core's one C++ call
    (step_cpu.recurrent_core with the readout's weights): tokens, logits and every decoded token's exit iteration
    equal mix's iterations through the modules bit for bit; the tokens exit at different iterations, and in the
    bounded state both sequences exit early at some tokens (the iterations stop there)."""
    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    config = LMConfig(vocab_size=300, hidden_size=HIDDEN, num_heads=2,
                      layers=["attention", "recurrent_depth", "attention"],
                      mixer_options={"recurrent_depth": {"core": ["attention", "deltanet"], "mean_steps": 6,
                                                         "state_mode": mode}})
    model = LanguageModel(config).to("cpu", dtype).eval()
    layer, prompt = model.blocks[1].mixer, torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))

    def generate():  # sampled, so that the tokens and their exits vary; each step's exits (not the prefill's)
        exits = []
        tokens, logits = model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(1),
                                        return_logits=True, exit_threshold=1e-3,
                                        on_token=lambda _: exits.append(layer.last_exit_steps.clone()))
        return tokens, logits, torch.cat(exits[1:], 1)

    with torch.no_grad():
        _, state = model(prompt, model.init_state(2, capacity=16))
        assert model._cpu_decoder(state, model._step_options(None, None, 1e-3)) is not None
    tokens, logits, exits = generate()
    assert exits.shape == (2, 9) and exits.min() < 6 and exits.max() > exits.min()
    if mode == "bounded":
        assert (exits < 6).all(0).any()
    monkeypatch.setattr(LanguageModel, "_cpu_decoder", lambda self, state, options: None)
    want_tokens, want_logits, want_exits = generate()
    assert torch.equal(tokens, want_tokens) and torch.equal(logits, want_logits) and torch.equal(exits, want_exits)
