"""The LM's decoding step (LanguageModel.decode_step) as one static graph: every mixer, on the reference
backend, traces one step under torch.compile(fullgraph=True) without a graph break (no host sync, no shape
change: the one-token steps and the preallocated attention cache); every mixer runs on static buffers (its
state written back in place), on a GPU as one step captured in a CUDA graph and replayed token after token;
each gives the eager steps' logits and states over several chained steps."""

import pytest
import torch

from seqmix.archs import MIXERS
from seqmix.archs.lm import LanguageModel, LMConfig
from tests.helpers import DEVICE, ON_GPU, assert_rel

# A small core for the recurrent depth, with an attention (preallocated cache) and a recurrent mixer.
MIXER_OPTIONS = {"recurrent_depth": {"core": ["attention", "mamba2"], "mean_steps": 2}}
# The hourglass's decoding token closes a segment or not, and only a closed segment runs the inner stack:
# a data-dependent step, chosen by reading the boundaries back (docs/design.md, "The decoding step"). It
# decodes eagerly (tests/archs/test_hourglass.py, tests/archs/test_lm.py) but is not one graph.
STATIC_STEP_MIXERS = sorted(set(MIXERS) - {"hourglass"})
PROMPT, STEPS = 9, 3


def _flat(state):
    return {f"{i}.{name}": value.clone() for i, s in enumerate(state) for name, value in s.items()}


def _cloned(state):
    return [{name: value.clone() for name, value in s.items()} for s in state]


def _copy_into(state, source):
    """Writes ``source``'s tensors into ``state``'s, in place; they must have the same names, shapes and dtypes
    (copy_ alone would broadcast a smaller tensor or cast another dtype)."""
    for s, src in zip(state, source, strict=True):
        assert s.keys() == src.keys()
        for name, value in s.items():
            assert (value.shape, value.dtype) == (src[name].shape, src[name].dtype), name
            value.copy_(src[name])


def _model_and_tokens(name):
    """A 2-layer LM of width 32 with ``name`` in both layers (eval mode, on DEVICE) and tokens [2, PROMPT + STEPS]."""
    torch.manual_seed(0)
    options = {name: MIXER_OPTIONS[name]} if name in MIXER_OPTIONS else {}
    model = LanguageModel(LMConfig(hidden_size=32, num_heads=2, layers=[name, name], mixer_options=options))
    tokens = torch.randint(0, 256, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return model.to(DEVICE).eval(), tokens


def _eager_steps(model, tokens, state):
    """Logits [2, STEPS, vocab] and the flat final state of STEPS eager decode_step calls after the prompt."""
    logits = []
    for t in range(PROMPT, PROMPT + STEPS):
        out, state = model.decode_step(tokens[:, t : t + 1], state)
        logits.append(out)
    return torch.stack(logits, 1), _flat(state)


def _assert_same_steps(model, name, how, got, want):
    (got_logits, got_state), (want_logits, want_state) = got, want
    assert got_logits.shape == (2, STEPS, model.config.vocab_size)
    assert_rel(got_logits, want_logits, 1e-6, f"{name}: {how} decode-step logits")
    assert got_state.keys() == want_state.keys()
    for key, value in want_state.items():
        assert_rel(got_state[key], value, 1e-6, f"{name}: {how} decode-step state {key!r}")


@pytest.mark.parametrize("name", STATIC_STEP_MIXERS)
def test_decode_step_compiles_in_one_graph_and_equals_eager(name, monkeypatch):
    monkeypatch.setenv("SEQMIX_BACKEND", "reference")
    model, tokens = _model_and_tokens(name)
    torch._dynamo.reset()
    compiled = torch.compile(model.decode_step, fullgraph=True, backend="eager")
    with torch.no_grad():
        _, start = model(tokens[:, :PROMPT], model.init_state(2, capacity=PROMPT + STEPS))
        want = _eager_steps(model, tokens, _cloned(start))
        state, logits = _cloned(start), []
        for t in range(PROMPT, PROMPT + STEPS):
            out, state = compiled(tokens[:, t : t + 1], state)
            logits.append(out)
    _assert_same_steps(model, name, "compiled", (torch.stack(logits, 1), _flat(state)), want)


def _captured(step, state, start):
    """``step`` captured in a CUDA graph after one warm-up call on a side stream (Triton's compiles and
    autotuning, workspaces), with ``state`` reset to ``start`` after it; returns a call that replays the graph
    and returns the captured step's output tensor."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    _copy_into(state, start)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay():
        graph.replay()
        return out

    return replay


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name", STATIC_STEP_MIXERS)
def test_decode_step_replays_on_static_buffers(name, backend, monkeypatch):
    """One decode_step on static buffers, as a CUDA graph runs it (and benchmarks/bench_decode.py times it):
    the token read from one tensor, the new state written back into the state's own tensors (same shapes and
    dtypes). On a GPU the step is captured in a CUDA graph and replayed once per token (a host sync or a
    changing allocation fails the capture or the comparison); on the CPU it is called once per token. Either
    way, the eager steps' logits and states."""
    if backend == "auto":
        monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    else:
        monkeypatch.setenv("SEQMIX_BACKEND", backend)
    model, tokens = _model_and_tokens(name)
    with torch.no_grad():
        _, start = model(tokens[:, :PROMPT], model.init_state(2, capacity=PROMPT + STEPS))
        want = _eager_steps(model, tokens, _cloned(start))
        state, token = _cloned(start), tokens[:, PROMPT : PROMPT + 1].clone()

        def step():
            out, new_state = model.decode_step(token, state)
            _copy_into(state, new_state)
            return out

        run = _captured(step, state, start) if ON_GPU else step
        logits = []
        for t in range(PROMPT, PROMPT + STEPS):
            token.copy_(tokens[:, t : t + 1])
            logits.append(run().clone())
    how = "CUDA graph" if ON_GPU else "static-buffer"
    _assert_same_steps(model, name, how, (torch.stack(logits, 1), _flat(state)), want)


def test_attention_decoding_writes_the_preallocated_cache_in_place():
    """One-token calls write slot ``length`` of the preallocated cache (same storage, no growth); the state
    passed in still describes its tokens, and continuing it equals continuing a growing cache."""
    torch.manual_seed(0)
    layer = LanguageModel(LMConfig(hidden_size=32, num_heads=2, layers=["attention"])).blocks[0].mixer.to(DEVICE)
    x = torch.randn(2, PROMPT + 2, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        _, static = layer(x[:, :PROMPT], layer.init_state(2, capacity=PROMPT + 2))
        _, grown = layer(x[:, :PROMPT], layer.init_state(2))
        pointers = [static[n].data_ptr() for n in ("k", "v")]
        y, after = layer(x[:, PROMPT : PROMPT + 1], static)
        assert [after[n].data_ptr() for n in ("k", "v")] == pointers and after["k"].shape[2] == PROMPT + 2
        assert static["length"].tolist() == [PROMPT] * 2 and after["length"].tolist() == [PROMPT + 1] * 2
        want, _ = layer(x[:, PROMPT : PROMPT + 1], grown)
        again, _ = layer(x[:, PROMPT : PROMPT + 1], static)  # the state passed in is still valid
    assert_rel(y, want, 1e-5, "in-place decoding vs the growing cache")
    assert_rel(again, want, 1e-5, "decoding again from the state passed in")


@pytest.mark.parametrize("name", ["attention", "deltanet"])
def test_generate_compiled_equals_eager(name, monkeypatch):
    """``generate(compile=True)`` traces its per-token step (the checked prefill's unchecked successor) in one
    graph and draws the same tokens from the same logits as eager ``generate`` (Dynamo's eager backend: the
    trace without inductor's compile time)."""
    monkeypatch.setenv("SEQMIX_BACKEND", "reference")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "eager"}))
    torch.manual_seed(0)
    model = LanguageModel(LMConfig(hidden_size=32, num_heads=2, layers=[name, name])).to(DEVICE).eval()
    prompt = torch.randint(0, 256, (2, PROMPT), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch._dynamo.reset()
    want, want_logits = model.generate(prompt, STEPS + 1, temperature=0.0, return_logits=True)
    got, got_logits = model.generate(prompt, STEPS + 1, temperature=0.0, return_logits=True, compile=True)
    assert got.equal(want)
    assert_rel(got_logits, want_logits, 1e-6, f"{name}: compiled generate's logits")
