"""The hourglass mixer: the Mixer contract in every boundary mode, autoregressive correctness of the whole LM
for every mode with random boundary patterns, eval-mode determinism, the auxiliary losses and their gradients."""

import pytest
import torch

from seqmix.archs import build_mixer
from seqmix.archs.hourglass import BOUNDARY_MODES, Hourglass
from seqmix.archs.lm import LanguageModel, LMConfig
from tests.archs import contract
from tests.helpers import DEVICE, TOL, assert_rel, require_cpu_kernels, step_in_python

HIDDEN = 32
MODES = ["gumbel", "entropy", "fixed", "hnet"]  # whitespace reads tokens: tested through the LM below


def _options(mode):
    # The kernels' parity is tested in tests/kernels/pooling and the Triton layer in test_mixers.py;
    # here the reference backend keeps the interpreter out of the LM-level tests.
    return {"layers": ["attention"], "boundary": mode, "stride": 3, "backend": "reference"}


def _randomise_predictor(layer, seed):
    """Predictor weights large enough that the boundaries vary from token to token (~30-50% of them)."""
    if hasattr(layer, "predictor"):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            layer.predictor[2].weight.copy_(torch.randn(layer.predictor[2].weight.shape, generator=g))
            layer.predictor[2].bias.fill_(-0.3)


def _layer(mode, backend="reference", seed=0):
    torch.manual_seed(seed)
    layer = build_mixer("hourglass", hidden_size=HIDDEN, num_heads=2, **{**_options(mode), "backend": backend})
    _randomise_predictor(layer, seed)
    return layer.to(DEVICE).eval()


def _x(B, T, seed=1):
    return torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("mode", MODES)
def test_contract_in_every_mode(mode):
    layer, x = _layer(mode), _x(2, 40)
    with torch.no_grad():
        layer(x)
        rate = layer._boundaries(x, None, _layout(layer, x))[0].mean().item() if mode != "hnet" else None
    assert rate is None or 0.15 < rate < 0.7, f"boundary rate {rate}: the patterns are not random"
    contract.pieces_equal_one_call(layer, x, [1, 7, 8, 23], TOL[torch.float32])
    contract.decoding_equals_training_call(layer, x, 25, TOL[torch.float32])
    xs = [_x(1, t, seed=10 + i) for i, t in enumerate([19, 6, 13])]
    contract.padding_and_packing_equal_separate_calls(layer, xs, TOL[torch.float32])


def _streamed(layer, xt, state):
    """The general path's output and state for a one-token call xt [B, 1, D], and how many of its tokens are
    boundaries."""
    layout = _layout(layer, xt)
    if layer.boundary == "hnet":
        p = layer._hnet_probabilities(state["prev"].to(xt.dtype), xt[:, 0], state["position"])
        return (*layer._mix_hnet(xt, state, None, layout), int((p > 0.5).sum()))
    b, _ = layer._boundaries(xt, state, layout)
    return (*layer._stream_pooling(xt, b, state, None, layout), int((b[:, 0] > 0.5).sum()))


@pytest.mark.parametrize("mode", MODES)
def test_one_token_step_equals_the_general_path(mode):
    """Decoding one token per sequence, the one-token step gives what the general path (streaming pooling, or
    H-Net's chunk selection and EMA) gives: outputs and each sequence's state (Mixer.sequence_state: the inner
    attention's cache up to the sequence's length), whether every sequence's token is a boundary, none is, or
    (where boundaries vary by sequence) some are. All three kinds of step occur."""
    layer, x = _layer(mode), _x(2, 40)
    step_of = layer._hnet_step if mode == "hnet" else layer._pooling_step
    kinds = set()
    with torch.no_grad():
        _, state = layer(x[:, :5], layer.init_state(2))
        for t in range(5, 40):
            xt = x[:, t : t + 1]
            want, want_state, closes = _streamed(layer, xt, state)
            step = step_of(xt, state)
            kinds.add({0: "none", 2: "every"}.get(closes, "mixed"))
            out, state = step
            assert_rel(out, want, TOL[torch.float32], f"{mode} step {t}: output")
            assert state.keys() == want_state.keys()
            for i in range(2):  # each sequence's state as its mixers read it (a cache up to its length)
                got, expected = layer.sequence_state(state, i), layer.sequence_state(want_state, i)
                for key, value in expected.items():
                    assert_rel(got[key].float(), value.float(), TOL[torch.float32], f"{mode} step {t}: {key!r} of {i}")
    assert kinds == ({"none", "every"} if mode == "fixed" else {"none", "every", "mixed"}), kinds


def _layout(layer, x):
    from seqmix.kernels.pooling import segments_of

    B, T, _ = x.shape
    return segments_of(torch.zeros(B, T, dtype=torch.bool, device=x.device), B, T, B, None)


def _lm(mode, seed=0):
    torch.manual_seed(seed)
    config = LMConfig(vocab_size=300, hidden_size=HIDDEN, num_heads=2, layers=["attention", "hourglass", "attention"],
                      mixer_options={"hourglass": _options(mode)})
    model = LanguageModel(config).to(DEVICE)
    _randomise_predictor(model.blocks[1].mixer, seed)
    return model


def _text_tokens(B, T, seed):
    """Bytes of words and spaces, so the whitespace mode sees boundaries too."""
    g = torch.Generator().manual_seed(seed)
    letters = torch.randint(97, 123, (B, T), generator=g)
    spaces = torch.rand(B, T, generator=g) < 0.25
    return torch.where(spaces, torch.full_like(letters, 32), letters).to(DEVICE)


@pytest.mark.parametrize("mode", [*MODES, "whitespace"])
@pytest.mark.parametrize("training", [False, True])
def test_logits_never_see_the_future(mode, training):
    """Changing the tokens after t leaves the logits up to t unchanged (eval: deterministic boundaries;
    training: the same Gumbel noise in both calls)."""
    model = _lm(mode).train(training)
    tokens = _text_tokens(2, 36, seed=3)
    for t in (0, 11, 29):
        changed = tokens.clone()
        changed[:, t + 1 :] = _text_tokens(2, 36 - t - 1, seed=4 + t)
        with torch.no_grad():
            torch.manual_seed(5)
            a, _ = model(tokens)
            torch.manual_seed(5)
            b, _ = model(changed)
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], msg=f"{mode}: logits up to {t} changed")
        if not training:
            assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("mode", ["whitespace", "gumbel"])
def test_lm_prefill_and_decoding_equal_one_call(mode):
    model, tokens = _lm(mode).eval(), _text_tokens(2, 30, seed=6)
    with torch.no_grad():
        full, _ = model(tokens)
        a, state = model(tokens[:, :17], model.init_state(2))
        steps = [a]
        for t in range(17, 30):
            out, state = model(tokens[:, t : t + 1], state)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_eval_is_deterministic_and_training_samples():
    layer, x = _layer("gumbel"), _x(2, 30)
    with torch.no_grad():
        assert torch.equal(layer(x)[0], layer(x)[0])
        layer.train()
        torch.manual_seed(0)
        first = layer(x)[0]
        torch.manual_seed(1)
        assert not torch.equal(first, layer(x)[0])


@pytest.mark.parametrize("mode", MODES)
def test_auxiliary_losses_reach_the_boundary_parameters(mode):
    """The LM's auxiliary terms: a finite loss and the logged scalars, once per training call; every
    parameter of the hourglass gets a gradient from the LM loss plus the auxiliary loss."""
    model = _lm(mode).train()
    tokens = _text_tokens(2, 24, seed=7)
    logits, _ = model(tokens)
    aux, metrics = model.auxiliary(logits)
    assert {"layer1.loss", "layer1.boundary_loss", "layer1.boundary_rate", "layer1.mean_segment_length"} <= set(metrics)
    assert torch.isfinite(aux) and (aux > 0 if mode != "fixed" else aux == 0)
    assert model.auxiliary(logits)[1] == {}, "the terms of one call are handed out once"
    (torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + aux).backward()
    silent = [n for n, p in model.blocks[1].mixer.named_parameters() if p.grad is None or not p.grad.any()]
    assert not silent, silent
    with torch.no_grad():
        model(tokens)
    assert model.auxiliary(logits)[1] == {}, "calls without gradients leave nothing"


def test_gumbel_prior_pulls_the_rate_towards_the_prior():
    """The Binomial prior's gradient raises the boundary logits when the rate is below the prior."""
    layer = _layer("gumbel").train()
    with torch.no_grad():
        layer.predictor[2].bias.fill_(-4.0)
    layer(_x(2, 50))
    layer.auxiliary(None)["loss"].backward()
    assert layer.predictor[2].bias.grad.item() < 0


def test_no_weight_decay_flags():
    for mode in ("gumbel", "hnet"):
        layer = _layer(mode)
        flagged = {n for n, p in layer.named_parameters() if getattr(p, "no_weight_decay", False)}
        expected = {"up_norm.weight"} | ({"null", "down_norm.weight", "predictor.0.bias", "predictor.2.bias"}
                                         if mode == "gumbel" else set())
        assert expected <= flagged, flagged


def test_bad_options():
    with pytest.raises(ValueError, match="boundary must be one of"):
        build_mixer("hourglass", hidden_size=HIDDEN, boundary="random")
    with pytest.raises(ValueError, match="prior must lie in"):
        build_mixer("hourglass", hidden_size=HIDDEN, prior=1.5)
    with pytest.raises(ValueError, match="unknown mixer"):
        build_mixer("hourglass", hidden_size=HIDDEN, layers=["mamba9"])
    with pytest.raises(ValueError, match="observe_tokens"):
        build_mixer("hourglass", hidden_size=HIDDEN, boundary="whitespace")(_x(1, 4).cpu())


def test_whitespace_with_left_padding_equals_separate_calls():
    """The token ids are packed with the attention mask as x is."""
    model = _lm("whitespace").eval()
    a, b = _text_tokens(1, 21, seed=8), _text_tokens(1, 13, seed=9)
    padded = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=b.dtype, device=DEVICE), b], 1)])
    mask = torch.ones_like(padded)
    mask[1, :8] = 0
    with torch.no_grad():
        both, _ = model(padded, attention_mask=mask)
        alone_a, _ = model(a)
        alone_b, _ = model(b)
    torch.testing.assert_close(both[0], alone_a[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[1, 8:], alone_b[0], rtol=1e-4, atol=1e-4)


def test_max_segments_caps_the_shortened_sequence():
    """A cap at or above every count changes nothing; a smaller one still gives a causal output of the same shape."""
    x = _x(2, 40)
    free = _layer("fixed")
    with torch.no_grad():
        y, _ = free(x)
        free.max_segments = 40 // 3
        torch.testing.assert_close(free(x)[0], y)
        free.max_segments = 4
        capped, _ = free(x)
    assert capped.shape == y.shape
    torch.testing.assert_close(capped[:, :12], y[:, :12])  # the first 4 segments close at token 11
    assert not torch.allclose(capped[:, 15:], y[:, 15:])


PATHS = {"token": "the LM's token one C++ call", "layer": "the layer's token one C++ call",
         "steps": "the layer's Python step"}


@pytest.mark.parametrize("mode", BOUNDARY_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", list(PATHS), ids=list(PATHS.values()))
def test_decoding_tokens_bind_the_inner_blocks_equal_to_their_module_calls(mode, dtype, path, monkeypatch):
    """A decoding token of every mode: where every block of the LM is one C++ call, the LM's whole token is one
    (step_cpu.decoder running the layer's HourglassStep among its blocks); where the LM's other blocks are not (here
    the hourglass layer's step wrapped in Python) but the inner blocks are ordinary ones of a LayerCall, the
    layer's token is one (Hourglass.cpu_decoding_step, step_cpu.pooling_step and hnet_step); else the layer's
    Python step with the inner blocks' bound C++ steps (here Mamba's step wrapped in Python). generate's tokens and
    logits equal those of the inner blocks' module calls bit for bit, with segments closing along the way (H-Net's
    projections away from their identity and zero initialisation; the whitespace mode reading each step's tokens,
    every even id a closer), and in a batch of two closing at one sequence and not the other."""
    from seqmix.archs import hourglass
    from seqmix.archs.mamba import Mamba
    from seqmix.kernels import step_cpu

    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the inner blocks' norms on their cpu backend
    tokens_seen = {"close": 0, "open": 0, "mixed": 0}
    calls = {"decoder": 0, "layer program": 0}
    decoder, program = step_cpu.decoder, "hnet_step" if mode == "hnet" else "pooling_step"
    build = getattr(step_cpu, program)

    def counted_decoder(embed, norm_weight, eps, blocks):
        calls["decoder"] += any(type(block.call) is step_cpu.ProgramCall for block in blocks)
        return decoder(embed, norm_weight, eps, blocks)

    def counted_program(*args):
        step = build(*args)

        def run(x, state, tokens=None):
            calls["layer program"] += 1
            return step(x, state, tokens)

        return step if path == "token" else run  # the LM's decoder takes the program itself

    def counted_tokens(decode):
        def run(tokens, state):
            logits, new = decode(tokens, state)
            # A close resets the segment's count (pooling) or moves the EMA (hnet).
            closed = (new[1]["ema"] != state[1]["ema"]).any(1) if mode == "hnet" else new[1]["count"].eq(0)
            tokens_seen["close" if closed.all() else "open" if not closed.any() else "mixed"] += 1
            return logits, new

        return run

    decoder_of = LanguageModel._decoder
    monkeypatch.setattr(LanguageModel, "_decoder", lambda *args: counted_tokens(decoder_of(*args)))
    monkeypatch.setattr(step_cpu, "decoder", counted_decoder)
    monkeypatch.setattr(step_cpu, program, counted_program)
    if mode == "whitespace":  # every even token id closes: boundaries at about half the sampled tokens
        monkeypatch.setattr(hourglass, "WORD_CLOSERS", tuple(range(0, 300, 2)))
    if path == "layer":
        step_in_python(monkeypatch, Hourglass)
    if path == "steps":
        step_in_python(monkeypatch, Mamba)
    torch.manual_seed(0)
    config = LMConfig(vocab_size=300, hidden_size=HIDDEN, num_heads=2, layers=["attention", "hourglass"],
                      mixer_options={"hourglass": {"layers": ["attention", "mamba"], "boundary": mode, "stride": 2}})
    model = LanguageModel(config).to("cpu", dtype).eval()
    g, layer = torch.Generator().manual_seed(0), model.blocks[1].mixer
    _randomise_predictor(layer, 0)
    with torch.no_grad():
        if mode in ("gumbel", "entropy"):  # a predictor whose decisions change from token to token
            layer.predictor[0].weight.copy_(3 * torch.randn(layer.predictor[0].weight.shape, generator=g, dtype=dtype)
                                            / HIDDEN**0.5)
            layer.predictor[2].bias.zero_()
        if mode == "hnet":  # projections away from their identity and zero initialisation
            for proj in (layer.q_proj, layer.k_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=g, dtype=dtype) / HIDDEN**0.5)
            residual = layer.residual_proj.weight
            residual.copy_(0.1 * torch.randn(residual.shape, generator=g, dtype=dtype))
    both = _text_tokens(2, 7, 1).cpu()
    prompts = [both[:1], both[1:], both]  # one sequence's segments close at some tokens; two disagree at some
    with torch.no_grad():
        _, state = model(both, model.init_state(2, capacity=20))
        assert model._cpu_decoder(state, {}) is not None

    def generate(prompt):  # sampled, so that the tokens (and the boundaries) vary
        return model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(4),
                              return_logits=True)

    calls["decoder"] = 0
    got = [generate(prompt) for prompt in prompts]
    assert sum(tokens_seen.values()) == 3 * 11 and tokens_seen["close"] > 0, tokens_seen
    assert tokens_seen["open"] > 0 and (mode == "fixed" or tokens_seen["mixed"] > 0)
    want = {"token": {"decoder": 3, "layer program": 0}, "layer": {"decoder": 0, "layer program": 3 * 11},
            "steps": {"decoder": 0, "layer program": 0}}[path]
    assert calls == want, (calls, tokens_seen)
    monkeypatch.setattr(Hourglass, "_inner_parts", lambda self, like, state: None)
    with torch.no_grad():
        assert model._cpu_decoder(state, {}) is None
    for (tokens, logits), prompt in zip(got, prompts):
        want_tokens, want_logits = generate(prompt)
        assert torch.equal(tokens, want_tokens) and torch.equal(logits, want_logits)


def test_decoding_step_takes_the_cpp_program_only_where_the_predictor_is_not_onednns(monkeypatch):
    """At 64 rows the predictor's product is oneDNN's (seqmix.kernels.linear), whose rounding the C++ program does
    not share: the bound step is the layer's Python step there, the program (a ProgramCall) at fewer rows; both
    give mix's token."""
    from seqmix.kernels import linear as linear_module
    from seqmix.kernels import step_cpu

    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(linear_module, "ONEDNN", True)
    torch.manual_seed(0)
    layer = build_mixer("hourglass", hidden_size=HIDDEN, num_heads=2, layers=["attention"], boundary="gumbel").eval()
    _randomise_predictor(layer, 0)
    for B, takes_program in ((64, False), (2, True)):
        x = torch.randn(B, 6, HIDDEN)
        with torch.no_grad():
            _, state = layer(x[:, :5], layer.init_state(B, capacity=8))
            step = layer.cpu_decoding_step(x[:, 0].detach()[:0], state)
            assert (type(step) is step_cpu.ProgramCall) is takes_program
            y, _ = step(x[:, 5], state)
            want, _ = layer(x[:, 5:], state)
        assert_rel(y, want[:, 0], TOL[torch.float32], f"{B} rows")
