"""The layers' products (seqmix/kernels/linear.py): oneDNN's path against F.linear in float64 (output and the
gradients of x, weight and bias), which calls take it, no_grad and torch.compile, and the Linear module on it.
The oneDNN path is switched on here whatever the CPU (on Intel's, :data:`ONEDNN` is off)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.archs.modules import Linear
from seqmix.kernels import linear as linear_module
from seqmix.kernels.linear import MIN_ROWS, linear, onednn_serves
from tests.helpers import assert_rel

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_linear_pointwise")
                                or not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    monkeypatch.setattr(linear_module, "ONEDNN", True)


def _inputs(lead, features, out, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, features, generator=g, dtype=torch.float64)
    w = torch.randn(out, features, generator=g, dtype=torch.float64) / features**0.5
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(*lead, out, generator=g, dtype=torch.float64)
    return x, w, b, dy


def _run(fn, x, w, b, dy):
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(*leaves) if b is not None else fn(*leaves, None)
    return (y, *torch.autograd.grad(y, leaves, dy))


@settings(max_examples=15, deadline=None)
@given(lead=st.sampled_from([(64,), (2, 40), (3, 33, 5), (1, 200)]), features=st.integers(1, 130),
       out=st.integers(1, 70), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_onednn_path_matches_float64(lead, features, out, bias, seed):
    """Output and every gradient in float32 through oneDNN against F.linear in float64: the error relative to the
    sums of the terms' magnitudes (F.linear of |x|, |w|, |b| with |dy| in float64), which float32's rounding bounds
    whatever the sums cancel: at most 4.9e-8 over 300 draws, 4e-4 and more with the products in bfloat16. (Relative
    to the result itself it does not: a weight gradient of 200 products that cancel to 1/240 of their magnitudes,
    features = out = 1, is 6.9e-6 off in float32, in oneDNN's order and in torch.mm's alike.)"""
    x, w, b, dy = _inputs(lead, features, out, bias, seed)
    x32, w32 = x.float(), w.float()
    assert onednn_serves(x32, w32)
    b32 = None if b is None else b.float()
    got = _run(linear, x32, w32, b32, dy.float())
    want = _run(F.linear, x, w, b, dy)
    magnitudes = _run(F.linear, x.abs(), w.abs(), None if b is None else b.abs(), dy.abs())
    for name, a, r, m in zip(("y", "dx", "dweight", "dbias"), got, want, magnitudes):
        assert a.dtype == torch.float32
        err = ((a.double() - r).norm() / m.norm()).item()
        assert err <= 5e-7, f"{name}: error {err:.3e} of the magnitudes' norm > 5e-7"


def test_which_calls_take_onednn():
    """Float32 CPU inputs of at least MIN_ROWS rows do; fewer rows (decoding), float64, autocast and an empty
    feature dimension take F.linear, and so does every call when ONEDNN is off."""
    w = torch.randn(8, 16)
    assert onednn_serves(torch.randn(MIN_ROWS, 16), w)
    assert onednn_serves(torch.randn(2, MIN_ROWS // 2, 16), w)
    assert not onednn_serves(torch.randn(MIN_ROWS - 1, 16), w)
    assert not onednn_serves(torch.randn(1, 1, 16), w)
    assert not onednn_serves(torch.randn(MIN_ROWS, 16, dtype=torch.float64), w.double())
    assert not onednn_serves(torch.randn(MIN_ROWS, 0), torch.randn(8, 0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_serves(torch.randn(MIN_ROWS, 16), w)
    linear_module.ONEDNN = False
    assert not onednn_serves(torch.randn(MIN_ROWS, 16), w)


def test_bad_weight_and_bias_are_named():
    x = torch.randn(MIN_ROWS, 16)
    with pytest.raises(ValueError, match="weight must be"):
        linear(x, torch.randn(8, 15))
    with pytest.raises(ValueError, match="bias must be"):
        linear(x, torch.randn(8, 16), torch.randn(7))
    with pytest.raises(ValueError, match="bias must be"):
        linear(x, torch.randn(8, 16), torch.randn(8, dtype=torch.float64))


def test_without_autograd_the_same_values():
    """Under no_grad (prefill, evaluation) the forward alone: the same output as with autograd."""
    x, w, b, _ = (None if t is None else t.float() for t in _inputs((2, 50), 40, 24, True, 3))
    with_grad = linear(x, w.requires_grad_(), b)
    with torch.no_grad():
        without = linear(x, w, b)
    assert not without.requires_grad
    assert torch.equal(with_grad.detach(), without)


def test_compiled_call_equals_eager():
    """torch.compile(fullgraph=True) traces through the custom ops: output and gradients equal the eager call's."""
    x, w, b, dy = (t.float() for t in _inputs((3, 40), 32, 12, True, 2))
    eager = _run(linear, x, w, b, dy)
    torch._dynamo.reset()
    compiled = _run(torch.compile(linear, fullgraph=True, backend="aot_eager_decomp_partition"), x, w, b, dy)
    for name, a, r in zip(("y", "dx", "dweight", "dbias"), compiled, eager):
        assert_rel(a, r, 1e-6, f"compiled {name}")


def test_linear_module_is_nn_linear_with_the_same_values():
    """Linear keeps nn.Linear's parameters and state dict; its output and gradients match nn.Linear's."""
    torch.manual_seed(0)
    ours = Linear(48, 20)
    theirs = torch.nn.Linear(48, 20)
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.Linear) and ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(4, 32, 48)
    y_ours, y_theirs = ours(x), theirs(x)
    dy = torch.randn_like(y_ours)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    assert_rel(y_ours, y_theirs, 2e-6, "y")
    assert_rel(ours.weight.grad, theirs.weight.grad, 2e-6, "dweight")
    assert_rel(ours.bias.grad, theirs.bias.grad, 2e-6, "dbias")


@pytest.mark.slow
def test_lm_training_step_through_onednn_compiles_in_one_graph():
    """A language model's training step whose products take oneDNN's path (2 x 80 tokens: 160 rows) traces
    under torch.compile(fullgraph=True), with the loss and gradients of the eager step."""
    from seqmix.archs.lm import LanguageModel, LMConfig

    torch.manual_seed(0)
    model = LanguageModel(LMConfig(hidden_size=32, num_heads=2, layers=["attention"]))
    tokens = torch.randint(0, 256, (2, 81))
    assert onednn_serves(torch.empty(2, 80, 32), torch.empty(8, 32))

    def loss_fn(tokens):
        logits, _ = model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def gradients(fn):
        model.zero_grad()
        loss = fn(tokens)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    eager_loss, eager_grads = gradients(loss_fn)
    torch._dynamo.reset()
    loss, grads = gradients(torch.compile(loss_fn, fullgraph=True, backend="aot_eager_decomp_partition"))
    assert_rel(loss, eager_loss, 1e-6, "loss")
    assert_rel(grads, eager_grads, 1e-5, "gradients")
