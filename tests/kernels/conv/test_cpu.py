"""The C++ CPU short causal conv for training (backend "cpu") against the reference in float64: outputs, final
states and the gradients of x, weight, bias and the initial state; widths 1-5, sequences shorter than the
state, chunks of the kernel's tasks split mid-sequence, packed sequences with empty ones, strided inputs;
float32 and bfloat16 against the reference; the automatic choice, torch.compile, bad input.

The first test to run builds the kernels (once per machine, cached by torch)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.kernels import BackendUnavailable, causal_conv1d, explain
from seqmix.kernels import cpu as cpu_build
from seqmix.kernels.conv import cpu as conv_cpu
from seqmix.kernels.conv.cpu import CHUNK
from seqmix.kernels.sequences import make_chunking
from tests.helpers import TOL, assert_rel, require_cpu_kernels, torch_threads
from tests.kernels.contract import check_no_tokens
from tests.kernels.conv.strategies import batch_layout

NAMES = ("x", "weight", "bias", "initial_state")


@pytest.fixture(autouse=True)
def kernels_built():
    """Skips where the kernels cannot be built here (no compiler or ninja)."""
    require_cpu_kernels()


def _inputs(B, T, D, W, n, bias=True, state=True, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, W, generator=g, dtype=torch.float64) / W**0.5
    b = torch.randn(D, generator=g, dtype=torch.float64) if bias else None
    h0 = torch.randn(n, D, W - 1, generator=g, dtype=torch.float64) if state else None
    return [None if t is None else t.to(dtype) for t in (x, w, b, h0)]


def _run(inputs, backend, activation, final=True, cu_seqlens=None, seed=1):
    """(out, final state, the gradients of the given inputs) of one random loss of both outputs."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    x, w, b, h0 = leaves
    out, ht = causal_conv1d(x, w, b, activation=activation, initial_state=h0, output_final_state=final,
                            cu_seqlens=cu_seqlens, backend=backend)
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g).to(out.dtype)).sum()
    if final:
        loss = loss + (ht * torch.randn(ht.shape, generator=g).to(ht.dtype)).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return out, ht, grads


def _check(inputs, activation, tol, final=True, cu_seqlens=None, reference_inputs=None):
    """The cpu backend on ``inputs`` against the reference on ``reference_inputs`` (default: the same inputs,
    and then the same dtypes too)."""
    same = reference_inputs is None
    got = _run(inputs, "cpu", activation, final, cu_seqlens)
    want = _run(inputs if same else reference_inputs, "reference", activation, final, cu_seqlens)
    assert got[0].dtype == inputs[0].dtype
    assert_rel(got[0], want[0], tol, "output")
    if final:
        assert got[1].dtype == want[1].dtype or not same
        assert_rel(got[1], want[1], tol, "final state")
    else:
        assert got[1] is None
    names = [name for name, t in zip(NAMES, inputs) if t is not None]
    for name, a, b in zip(names, got[2], want[2], strict=True):
        assert a.dtype == b.dtype or not same, f"d{name}: {a.dtype} vs {b.dtype}"
        assert_rel(a, b, tol, f"d{name}")


# (T, W): sequences shorter than the state (T < W-1), one token, and more than one chunk of the kernel's tasks,
# the last shorter than the state (its final state's rows and their gradients span two chunks).
SHAPES = [(1, 1), (1, 4), (2, 4), (3, 3), (9, 2), (CHUNK + 1, 4), (CHUNK + 40, 5)]


@pytest.mark.parametrize("T, W", SHAPES)
@pytest.mark.parametrize("activation, bias, state", [("silu", True, True), (None, False, False), ("silu", False, True)])
def test_float64_matches_reference(T, W, activation, bias, state):
    """D = 19: one block of channels with a partial vector in it."""
    _check(_inputs(2, T, 19, W, 2, bias, state, seed=T * 7 + W), activation, 1e-12)


def test_channel_blocks_and_no_final_state():
    """D = 150: a full block of channels and a partial one (float64: 64 per block), no final state."""
    _check(_inputs(1, 70, 150, 4, 1), "silu", 1e-12, final=False)


def test_packed_sequences_with_empty_ones():
    """Every sequence starts from its own state; an empty one passes its state through (and its gradient)."""
    lengths = [5, 0, 1, CHUNK + 3, 0, 2]
    cu = torch.tensor([0, *lengths]).cumsum(0)
    _check(_inputs(1, sum(lengths), 21, 4, len(lengths)), "silu", 1e-12, cu_seqlens=cu)


def test_strided_input():
    x, w, b, h0 = _inputs(2, 40, 24, 3, 2)
    strided = torch.randn(2, 24, 40, dtype=torch.float64).transpose(1, 2)
    strided.copy_(x)
    assert not strided.is_contiguous()
    _check([strided, w, b, h0], "silu", 1e-12)


def test_float32_matches_float64():
    inputs = _inputs(2, 300, 40, 4, 2, dtype=torch.float32)
    _check(inputs, "silu", TOL[torch.float32], reference_inputs=[t.double() for t in inputs])


def test_bfloat16_computes_in_float32_as_the_reference():
    """Half-precision inputs: computed in float32 and the output rounded once, as the reference does; the final
    state float32, every gradient in its input's dtype."""
    _check(_inputs(2, 50, 24, 4, 2, dtype=torch.bfloat16), "silu", 1e-2)


@settings(max_examples=15, deadline=None)
@given(layout=batch_layout(12, 4, 20), D=st.integers(1, 20), W=st.integers(1, 5),
       activation=st.sampled_from([None, "silu"]), bias=st.booleans(), state=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_float64_matches_reference_drawn(layout, D, W, activation, bias, state, seed):
    B, T, lengths = layout
    cu = None if lengths is None else torch.tensor([0, *lengths]).cumsum(0)
    n = B if lengths is None else len(lengths)
    _check(_inputs(B, T, D, W, n, bias, state, seed), activation, 1e-12, cu_seqlens=cu)


def test_sums_do_not_depend_on_the_threads():
    """dweight and dbias add per-chunk partial sums in a fixed order: bit for bit the same on 1 and 2 threads."""
    inputs = _inputs(2, 3 * CHUNK, 40, 4, 2, dtype=torch.float32)
    with torch_threads(1):
        one = _run(inputs, "cpu", "silu")
    with torch_threads(2):
        two = _run(inputs, "cpu", "silu")
    for a, b in zip((one[0], one[1], *one[2]), (two[0], two[1], *two[2])):
        assert torch.equal(a, b)


def test_no_tokens():
    empty = {"x": torch.randn(2, 0, 5), "weight": torch.randn(5, 3)}
    check_no_tokens(causal_conv1d, empty, (2, 0, 5), (2, 5, 2), "cpu")


def test_automatic_choice_takes_the_kernels_only_once_built(monkeypatch):
    """Built here (the fixture): the automatic choice takes them. Not compiled yet: it never compiles them for a
    call (the reference, or Triton's interpreter when it is on, serves), while backend="cpu" still serves."""
    x, w = torch.randn(1, 8, 4), torch.randn(4, 3)
    assert explain(causal_conv1d, x, w).backend == "cpu"
    monkeypatch.setattr(cpu_build, "ready", lambda: False)
    choice = explain(causal_conv1d, x, w)
    assert choice.backend != "cpu" and "not compiled here yet" in choice.reason
    assert explain(causal_conv1d, x, w, backend="cpu").backend == "cpu"


def test_bad_input():
    """The op's checks run before the choice; the cpu backend, named, refuses tensors off the CPU."""
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        causal_conv1d(torch.ones(1, 4, 3, dtype=torch.int32), torch.randn(3, 2), backend="cpu")
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, D, W-1\]"):
        causal_conv1d(torch.randn(2, 4, 3), torch.randn(3, 2), initial_state=torch.randn(2, 3, 2), backend="cpu")
    with pytest.raises(BackendUnavailable, match="'cpu' cannot serve this call: the C.. CPU kernels need CPU tensors"):
        causal_conv1d(torch.randn(1, 4, 3, device="meta"), torch.randn(3, 2, device="meta"), backend="cpu")
    x, wide = torch.randn(1, 4, 3), torch.randn(3, 17)
    with pytest.raises(BackendUnavailable, match="'cpu' cannot serve this call: weight must have at most 16 taps"):
        causal_conv1d(x, wide, backend="cpu")
    assert explain(causal_conv1d, x, wide).backend != "cpu"


def test_compiled_call_equals_eager():
    """torch.compile(fullgraph=True) traces through the cpu custom ops (aot_eager_decomp_partition, as on CPUs in
    tests/archs/test_compile.py): outputs and gradients equal the eager call's."""
    inputs = [t.requires_grad_() for t in _inputs(2, 20, 8, 4, 2, dtype=torch.float32)]

    def loss(x, w, b, h0):
        out, ht = causal_conv1d(x, w, b, activation="silu", initial_state=h0, output_final_state=True, backend="cpu")
        return (out * out).sum() + (ht * ht).sum()

    eager = torch.autograd.grad(loss(*inputs), inputs)
    compiled_loss = torch.compile(loss, fullgraph=True, backend="aot_eager_decomp_partition")
    compiled = torch.autograd.grad(compiled_loss(*inputs), inputs)
    for name, a, b in zip(NAMES, compiled, eager, strict=True):
        assert_rel(a, b, 1e-6, f"compiled d{name}")


@pytest.mark.parametrize("store_final", [True, False])
def test_custom_op_passes_opcheck(store_final):
    """Schema, fake implementation and autograd registration of the forward op, on packed sequences."""
    x, w, b, h0 = [t.requires_grad_() for t in _inputs(1, 30, 6, 3, 3, dtype=torch.float32)]
    chunking = make_chunking(torch.tensor([0, 10, 10, 30]), CHUNK)
    args = (x[0], w, b, h0, chunking.cu_seqlens, chunking.chunk_index, chunking.chunk_offsets, True, store_final)
    torch.library.opcheck(conv_cpu._chunk_fwd.op, args, test_utils=("test_schema", "test_autograd_registration",
                                                               "test_faketensor"))
