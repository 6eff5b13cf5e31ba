"""The language model: cached generation equals the no-cache forward for every mixer, safetensors
round trip, sampling, and configuration errors."""

import json

import pytest
import torch

from seqmix.archs import MIXERS
from seqmix.archs.lm import LanguageModel, LMConfig
from seqmix.kernels import step_cpu
from seqmix.kernels.step_cpu import decoder
from tests.helpers import DEVICE, TOL, assert_rel, require_cpu_kernels, torch_threads


def _model(layers, seed=0, **kw):
    torch.manual_seed(seed)
    config = LMConfig(vocab_size=300, hidden_size=32, num_heads=2, layers=layers, **kw)
    return LanguageModel(config).to(DEVICE).eval()


def _tokens(B, T, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# Mixers whose defaults are too slow for this test (recurrent_depth: 32 iterations of four attention blocks).
SMALL_OPTIONS = {"recurrent_depth": {"core": ["attention", "attention"], "mean_steps": 3}}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_generation_with_state_equals_no_cache_forward(name):
    model = _model([name, name], mixer_options={name: SMALL_OPTIONS[name]} if name in SMALL_OPTIONS else {})
    prompt = _tokens(2, 19)
    tokens, step_logits = model.generate(prompt, max_new_tokens=6, temperature=0.0, return_logits=True)
    assert tokens.shape == (2, 25) and tokens[:, :19].equal(prompt)
    with torch.no_grad():
        full, _ = model(tokens)
    # the logits token t+1 was drawn from are the full forward's logits at position t
    assert_rel(step_logits, full[:, 18:24], TOL[torch.float32], f"{name}: cached vs no-cache logits")
    assert step_logits.argmax(-1).equal(tokens[:, 19:])


def test_hybrid_prefill_in_pieces_equals_one_call():
    model, tokens = _model(["deltanet", "attention", "deltanet"]), _tokens(2, 40)
    with torch.no_grad():
        full, _ = model(tokens)
        a, state = model(tokens[:, :13], model.init_state(2))
        b, state = model(tokens[:, 13:], state)
    assert_rel(torch.cat([a, b], 1), full, TOL[torch.float32], "logits in two pieces")


def test_sampling_rules():
    model, prompt = _model(["attention"]), _tokens(3, 5)
    greedy = model.generate(prompt, 4, temperature=0.0)
    assert model.generate(prompt, 4, temperature=1.0, top_k=1).equal(greedy)
    g1, g2 = (torch.Generator(device=DEVICE).manual_seed(7) for _ in range(2))
    assert model.generate(prompt, 8, generator=g1).equal(model.generate(prompt, 8, generator=g2))
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="prompt must be"):
        model.generate(prompt[:, :0], 2)


def test_safetensors_round_trip(tmp_path):
    model, tokens = _model(["deltanet", "attention"], seed=3), _tokens(2, 17)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["layers"] == ["deltanet", "attention"]
    loaded = LanguageModel.from_pretrained(tmp_path, device=DEVICE).eval()
    with torch.no_grad():
        assert loaded(tokens)[0].equal(model(tokens)[0])
    # the head stays tied to the embedding after loading
    assert loaded.embed.weight.data_ptr() == loaded.state_dict()["embed.weight"].data_ptr()


def test_loading_weights_of_another_config_fails(tmp_path):
    _model(["deltanet"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.safetensors does not fit .*config.json"):
        LanguageModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        LanguageModel.from_pretrained(tmp_path / "nowhere")


def test_config_layers_shorthand_and_errors():
    assert LMConfig(layers=["deltanet*3", "attention"]).layers == ["deltanet"] * 3 + ["attention"]
    with pytest.raises(ValueError, match=r"unknown mixer name\(s\) \['mamba9'\]"):
        LanguageModel(LMConfig(layers=["mamba9"]))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        LanguageModel(LMConfig(hidden_size=100, num_heads=3))
    with pytest.raises(ValueError, match="no layer uses"):
        LanguageModel(LMConfig(layers=["deltanet"], mixer_options={"attention": {}}))
    with pytest.raises(ValueError, match="layers is empty"):
        LanguageModel(LMConfig(layers=[]))
    with pytest.raises(ValueError, match="tokens must be an int64 tensor"):
        _model(["attention"])(torch.zeros(2, 3, device=DEVICE))


def test_generate_calls_on_token_with_each_new_token():
    model, prompt = _model(["deltanet", "attention"]), _tokens(2, 5)
    seen = []
    tokens = model.generate(prompt, max_new_tokens=4, temperature=0.0, on_token=seen.append)
    assert [t.shape for t in seen] == [(2, 1)] * 4
    assert torch.cat(seen, 1).equal(tokens[:, 5:])


def test_config_json_names_the_model_type_and_unknown_fields_are_refused(tmp_path):
    _model(["deltanet"]).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    assert config["model_type"] == "seqmix"  # what transformers' AutoConfig reads (seqmix.hf)
    # transformers' metadata is read past when the file is a seqmix model's ...
    path.write_text(json.dumps({**config, "architectures": ["SeqmixForCausalLM"], "use_cache": True}))
    assert LanguageModel.from_pretrained(tmp_path).config.layers == ["deltanet"]
    # ... but a misspelt field of a plain seqmix config, or another model type, is an error
    plain = {k: v for k, v in config.items() if k != "model_type"}
    path.write_text(json.dumps({**plain, "hiden_size": 64}))
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['hiden_size'\]"):
        LanguageModel.from_pretrained(tmp_path)
    path.write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not a seqmix model"):
        LanguageModel.from_pretrained(tmp_path)


def test_layers_as_a_name_or_a_comma_list_and_mixer_options_checked():
    assert LMConfig(layers="deltanet").layers == ["deltanet"]
    assert LMConfig(layers="deltanet*2, attention").layers == ["deltanet", "deltanet", "attention"]
    with pytest.raises(ValueError, match="layers must be a mixer name, a comma-separated list"):
        LMConfig(layers=3)
    with pytest.raises(ValueError, match=r"mixer_options\['mamba'\]: Mamba takes no option\(s\) \['d_stat'\]; "
                                         r"its options are \['d_state', "):
        LanguageModel(LMConfig(layers=["mamba"], mixer_options={"mamba": {"d_stat": 8}}))
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['hidden_size'\]"):
        LanguageModel(LMConfig(layers=["mamba"], mixer_options={"mamba": {"hidden_size": 8}}))
    with pytest.raises(ValueError, match=r"mixer_options\['mamba'\] must be a mapping"):
        LanguageModel(LMConfig(layers=["mamba"], mixer_options={"mamba": 8}))


def test_token_ids_outside_the_vocabulary_are_refused():
    """A ValueError on CPU tensors (on CUDA tensors a device-side assertion: tests/kernels/test_checks.py)."""
    torch.manual_seed(0)
    model = LanguageModel(LMConfig(vocab_size=300, hidden_size=32, num_heads=2, layers=["attention"])).eval()
    for bad in (300, -1):
        tokens = _tokens(2, 5).cpu()
        tokens[1, 3] = bad
        with pytest.raises(ValueError, match=rf"tokens must be ids in \[0, vocab_size=300\), got values .*{bad}"):
            model(tokens)
        with pytest.raises(ValueError, match=r"tokens must be ids in \[0, vocab_size=300\)"):
            model.generate(tokens, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoding_blocks_mlp_half_and_the_readout_are_cpp_calls_equal_to_the_modules(dtype, monkeypatch):
    """On CPU tensors a decoding block's residual, MLP norm and SwiGLU are one C++ call
    (seqmix/kernels/mlp_step_cpu.cpp), and so are the final norm and the head (row_norm_cpu.cpp): chosen for one
    token without autograd, equal to the modules (SEQMIX_BACKEND=reference); opcheck of the custom ops."""
    from seqmix.kernels.backend import recording

    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _model(["shortconv", "attention"]).to("cpu", dtype)  # CPU tensors on a GPU machine too
    prompt = _tokens(2, 5).cpu()
    with torch.no_grad():
        state = model.init_state(2, capacity=6)
        _, state = model(prompt, state)
        with recording() as choices:
            logits, _ = model.decode_step(prompt[:, -1:], state)
        assert sum(c.op == "residual_swiglu_step" and c.backend == "cpu" for c in choices) == 2
        assert [c.backend for c in choices if c.op == "rms_norm_times_weight"] == ["cpu"]
        state = model.init_state(2, capacity=6)
        monkeypatch.setenv("SEQMIX_BACKEND", "reference")
        _, state = model(prompt, state)
        want, _ = model.decode_step(prompt[:, -1:], state)
    assert_rel(logits, want, 1e-13 if dtype == torch.float64 else 1e-6, "logits through the fused MLP and readout")
    block, g = model.blocks[0], torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 1, 32, generator=g, dtype=dtype) for _ in range(2))
    torch.library.opcheck(step_cpu.residual_swiglu_step.op, (x, y, block.mlp_norm.weight.detach(), 1e-5,
                                                         block.mlp.gate_up.weight.detach(),
                                                         block.mlp.down.weight.detach()),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(step_cpu.rms_norm_times_weight.op, (x[:, 0], model.norm.weight.detach(), 1e-5,
                                                              model.embed.weight.detach()),
                          test_utils=("test_schema", "test_faketensor"))


# The mixers whose decoding step is one C++ call (Mixer.cpu_decoding_step).
CPU_STEP_MIXERS = ["attention", "deltanet", "gated_deltanet", "gla", "mamba", "mamba2", "lightconv", "dynamicconv",
                   "shortconv", "recurrent_depth", "hourglass"]


# The mixers whose step is one C++ layer op (step_cpu.LayerCall): an LM of them decodes a token in one C++ call.
ONE_CALL_MIXERS = [name for name in CPU_STEP_MIXERS if name not in ("recurrent_depth", "hourglass")]


@pytest.mark.parametrize("options", [{}, {"deltanet": {"use_short_conv": False},
                                         "gated_deltanet": {"use_output_gate": False}}])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_lm_of_one_call_layers_decodes_a_token_in_one_cpp_call(dtype, options, monkeypatch):
    """Where every block's mixer step is one C++ layer op, generate's token is one C++ call (step_cpu.decoder,
    decoder_cpu.cpp): its logits and every state tensor equal decode_step's module calls bit for bit, token after
    token, the attention caches (written in place) included; also with a layer without a conv state (its op's
    empty conv output dropped) and one without its output gate."""
    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    built = []
    monkeypatch.setattr(step_cpu, "decoder", lambda *args: built.append(args) or decoder(*args))
    model = _model(ONE_CALL_MIXERS, mixer_options=options).to("cpu", dtype)
    prompt, new = _tokens(2, 7).cpu(), 6
    with torch.no_grad():
        state = model.init_state(2, capacity=7 + new)
        full, state = model(prompt, state)
        mine = [{key: value.clone() for key, value in s.items()} for s in state]
        decode = model._cpu_decoder(mine, {})
        assert len(built) == 1 and len(built[0][3]) == len(ONE_CALL_MIXERS)
        tokens = full[:, -1:].argmax(-1)
        for _ in range(new):
            want, state = model.decode_step(tokens, state)
            got, mine = decode(tokens, mine)
            assert got.dtype == torch.float32 and torch.equal(got, want)
            for want_state, got_state in zip(state, mine, strict=True):
                assert want_state.keys() == got_state.keys()
                assert all(torch.equal(want_state[key], got_state[key]) for key in want_state)
            tokens = want.argmax(-1, keepdim=True)
        with pytest.raises(RuntimeError, match=r"token 300 is not in \[0, 300\)"):
            decode(torch.full((2, 1), 300), mine)


def test_decoding_steps_give_the_same_logits_at_any_number_of_threads(monkeypatch):
    """At the tiny config's width (hidden 128) a decoding token's weight products are split by rows among the
    threads (linear_cpu.h, weight_times_rows; in_proj's, the MLP's and the head's are over the threshold): from one
    prefilled state, six decode_step tokens (each layer's one C++ step) with three threads give one thread's logits
    bit for bit, for an LM of attention and Mamba-2 layers and two sequences. (The prefill itself, ATen's products
    over the prompt, may round differently at another number of threads, so it is run once.)"""
    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    torch.manual_seed(0)
    model = LanguageModel(LMConfig(hidden_size=128, num_heads=4, layers=["attention", "mamba2"])).eval()
    runs = []
    with torch.no_grad():
        logits, state = model(_tokens(2, 7).cpu(), model.init_state(2, capacity=7 + 6))
        for n in (1, 3):
            tokens, steps = logits[:, -1:].argmax(-1), []
            mine = [{key: value.clone() for key, value in s.items()} for s in state]
            with torch_threads(n):
                for _ in range(6):
                    step, mine = model.decode_step(tokens, mine)
                    steps.append(step)
                    tokens = step.argmax(-1, keepdim=True)
            runs.append(torch.stack(steps, 1))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_generate_binds_the_cpp_steps_once_and_equals_the_module_calls(dtype, monkeypatch):
    """On CPU tensors generate's loop runs the layers' C++ steps bound once (LanguageModel._cpu_decoder) when every
    layer has one: the same calls as decode_step's modules make, so the same logits bit for bit, for an LM of
    every such mixer. A layer without one (the hourglass with whitespace boundaries, which reads each call's tokens)
    or SEQMIX_BACKEND=reference leaves generate the modules."""
    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # recurrent depth's norms on their cpu backend
    model = _model(CPU_STEP_MIXERS, mixer_options=SMALL_OPTIONS).to("cpu", dtype)
    prompt, new = _tokens(2, 7).cpu(), 5
    tokens, logits = model.generate(prompt, new, temperature=0.0, return_logits=True)
    with torch.no_grad():
        state = model.init_state(2, capacity=7 + new)
        full, state = model(prompt, state)
        assert model._cpu_decoder(state, {}) is not None
        want = [full[:, -1].float()]
        for i in range(new - 1):
            step, state = model.decode_step(tokens[:, 7 + i: 8 + i], state)
            want.append(step)
    assert logits.dtype == torch.float32 and torch.equal(logits, torch.stack(want, 1))
    assert torch.equal(tokens[:, 7:], logits.argmax(-1))
    with torch.no_grad():
        other = _model(["hourglass", "deltanet"], mixer_options={"hourglass": {"boundary": "whitespace"}}).to(
            "cpu", dtype)
        assert other._cpu_decoder(other.init_state(2), {}) is None
        assert model._cpu_decoder(model.init_state(2), {}) is None  # attention's cache without a capacity
        monkeypatch.setenv("SEQMIX_BACKEND", "reference")
        assert model._cpu_decoder(model.init_state(2, capacity=4), {}) is None
