"""The C++ CPU delta rule and gated delta rule (backend "cpu") against the float64 recurrence: outputs, final
states and the gradients of every input, the initial state included; packed sequences, lengths that are not a
multiple of the checkpoint interval, one token, strong decays, strided q/k/v, the custom ops under opcheck and
torch.compile, the automatic choice, and bad input.

The first test to run builds the kernels (once per machine, cached by torch: 1-4 minutes on 2 cores)."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.kernels import BackendUnavailable, delta_rule, explain, gated_delta_rule
from seqmix.kernels import cpu as cpu_build
from seqmix.kernels.deltanet import cpu as cpu_kernels
from seqmix.kernels.deltanet import delta_rule_recurrent, gated_delta_rule_recurrent
from tests.helpers import TOL, assert_rel, require_cpu_kernels, torch_threads
from tests.kernels.contract import assert_grads, outputs_and_grads
from tests.kernels.deltanet.cases import CPU_HEAD_DIMS, Case, cases, make_gated_inputs, make_inputs

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def kernels_built():
    require_cpu_kernels()


def _inputs(case, dtype, gated, g=None):
    """(q, k, v, g or None, beta, h0 or None) with gradients, in ``dtype`` (the state in float64 for float64)."""
    if gated:
        q, k, v, g, beta, h0 = make_gated_inputs(case, dtype, CPU, g=g)
        g = g.to(dtype)
    else:
        (q, k, v, beta, h0), g = make_inputs(case, dtype, CPU), None
    if h0 is not None and dtype == torch.float64:
        h0 = h0.double()
    return [None if t is None else t.detach().requires_grad_() for t in (q, k, v, g, beta, h0)]


def _op(backend, case, final_state=True):
    """f(q, k, v, g, beta, h0) -> (o, final state) of the public op (backend "cpu") or of the recurrence."""
    cu = case.cu_seqlens(CPU)
    scale = case.k**-0.5

    def call(q, k, v, g, beta, h0):
        if backend == "oracle":
            if g is None:
                return delta_rule_recurrent(q, k, v, beta, scale, h0, final_state, cu)
            return gated_delta_rule_recurrent(q, k, v, g, beta, scale, h0, final_state, cu)
        kwargs = {"scale": scale, "initial_state": h0, "output_final_state": final_state, "cu_seqlens": cu,
                  "backend": "cpu"}
        if g is None:
            return delta_rule(q, k, v, beta, **kwargs)
        return gated_delta_rule(q, k, v, g, beta, **kwargs)

    return call


def _names(inputs):
    return [n for n, t in zip(("q", "k", "v", "g", "beta", "initial_state"), inputs) if t is not None]


def _check_float64(case, gated, g=None, tol=1e-10):
    inputs = _inputs(case, torch.float64, gated, g)
    o, s, grads = outputs_and_grads(_op("cpu", case), inputs, case.seed)
    o_ref, s_ref, ref_grads = outputs_and_grads(_op("oracle", case), inputs, case.seed)
    assert o.dtype == s.dtype == torch.float64
    assert_rel(o, o_ref, tol, "output")
    assert_rel(s, s_ref, tol, "final state")
    assert_grads(_names(inputs), grads, ref_grads, tol)
    return o, s


def _check_float32(case, gated, g=None, final_state=True, dg_scale=False):
    """The float32 kernels against the float64 recurrence on the same inputs; without the final state only
    the output's gradient flows."""
    inputs = _inputs(case, torch.float32, gated, g)
    up = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    o, s = _op("cpu", case, final_state)(*inputs)
    o_ref, s_ref = _op("oracle", case)(*up)
    tol = TOL[torch.float32]
    assert o.dtype == torch.float32
    assert_rel(o, o_ref, tol, "output")
    gen = torch.Generator().manual_seed(case.seed)
    do = torch.randn(o.shape, generator=gen)
    loss, loss_ref = (o * do).sum(), (o_ref * do.double()).sum()
    if final_state:
        assert s.dtype == torch.float32
        assert_rel(s, s_ref, tol, "final state")
        ds = torch.randn(s.shape, generator=gen)
        loss, loss_ref = loss + (s * ds).sum(), loss_ref + (s_ref * ds.double()).sum()
    else:
        assert s is None
    grads = torch.autograd.grad(loss, [t for t in inputs if t is not None])
    ref_grads = torch.autograd.grad(loss_ref, [t for t in up if t is not None])
    assert all(a.dtype == t.dtype for a, t in zip(grads, [t for t in inputs if t is not None]))
    assert_grads(_names(inputs), grads, ref_grads, tol, dg_scale)
    return o, s


@settings(max_examples=8, deadline=None)
@given(case=cases(max_t=70, head_dims=CPU_HEAD_DIMS), gated=st.booleans())
def test_matches_recurrence_in_float64(case, gated):
    _check_float64(case, gated)


@settings(max_examples=4, deadline=None)
@given(case=cases(max_t=70, head_dims=CPU_HEAD_DIMS), gated=st.booleans())
def test_matches_recurrence_in_float32(case, gated):
    _check_float32(case, gated)


@pytest.mark.parametrize("gated", [False, True])
def test_one_token_wide_heads_and_ragged_lengths(gated):
    """T = 1; V = 40 (float64: 5 vectors of 8 lanes, rounded up to 8, most of them padding); K = 20 (not a
    multiple of the lanes); 33 tokens (two checkpoints and a token past them)."""
    _check_float64(Case(batch=2, lengths=None, seqlen=1, heads=2, k=20, v=40, initial_state=True, seed=3), gated)
    _check_float64(Case(batch=1, lengths=None, seqlen=33, heads=1, k=20, v=40, initial_state=False, seed=4), gated)


@pytest.mark.parametrize("gated, threads", [(False, 1), (True, 2)])
def test_packed_sequences_with_empty_ones_keep_their_states(gated, threads):
    """Ragged packed sequences (empty ones among them), on one thread and on two (10 tasks of unequal length)."""
    case = Case(batch=1, lengths=(0, 9, 0, 35, 1), seqlen=45, heads=2, k=16, v=24, initial_state=True, seed=5)
    with torch_threads(threads):
        _, s = _check_float64(case, gated)
        h0 = _inputs(case, torch.float64, gated)[5]
        torch.testing.assert_close(s[0], h0[0])
        torch.testing.assert_close(s[2], h0[2])
        _check_float32(case, gated, final_state=False)


def test_strong_decays():
    """Log decays down to -20 per token: exp underflows towards 0 within a few tokens in float32; across
    checkpoints and a sequence boundary."""
    case = Case(batch=1, lengths=(40, 30), seqlen=70, heads=2, k=16, v=16, initial_state=True, seed=21)
    g = -20 * torch.rand(1, 70, 2, generator=torch.Generator().manual_seed(0))
    _check_float64(case, True, g=g)
    o, s = _check_float32(case, True, g=g, dg_scale=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()


@pytest.mark.parametrize("gated", [False, True])
def test_strided_query_key_value(gated):
    """q, k, v as views of one [B, T, H (2K + V)] projection (as DeltaNet splits its conv output)."""
    B, T, H, K, V = 2, 21, 2, 8, 12
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(B, T, H * (2 * K + V), generator=gen, dtype=torch.float64, requires_grad=True)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, T, H, generator=gen, dtype=torch.float64) if gated else None

    def split(x):
        q, k, v = x.split([H * K, H * K, H * V], -1)
        return q.view(B, T, H, K), torch.nn.functional.normalize(k.view(B, T, H, K), dim=-1), v.view(B, T, H, V)

    case = Case(batch=B, lengths=None, seqlen=T, heads=H, k=K, v=V, initial_state=False, seed=8)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    results = []
    for op in (_op("cpu", case), _op("oracle", case)):
        q, k, v = split(qkv)
        assert not q.is_contiguous() and not v.is_contiguous()
        o, s = op(q, k, v, g, beta, None)
        results.append((o, torch.autograd.grad((o * do).sum() + s.sum(), qkv)[0]))
    (o, grad), (o_ref, ref) = results
    assert_rel(o, o_ref, 1e-10, "output")
    assert_rel(grad, ref, 1e-10, "dqkv")


@pytest.mark.parametrize("gated", [False, True])
def test_gradients_through_the_final_state_alone(gated):
    """A loss on the final state only: no output gradient reaches the backward (it runs on zeros), and q, which
    only the outputs read, gets a zero gradient."""
    case = Case(batch=2, lengths=None, seqlen=19, heads=2, k=8, v=8, initial_state=True, seed=11)
    inputs = _inputs(case, torch.float64, gated)
    wanted = [t for t in inputs[1:] if t is not None]
    _, s = _op("cpu", case)(*inputs)
    _, s_ref = _op("oracle", case)(*inputs)
    weight = torch.randn(s.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dq, *grads = torch.autograd.grad((s * weight).sum(), [inputs[0], *wanted])
    ref_grads = torch.autograd.grad((s_ref * weight).sum(), wanted)
    assert torch.equal(dq, torch.zeros_like(dq))
    for name, a, b in zip(_names([None, *inputs[1:]]), grads, ref_grads, strict=True):
        assert_rel(a, b, 1e-10, f"d{name}")


@pytest.mark.parametrize("gated", [False, True])
def test_without_gradients_the_forward_stores_no_checkpoints(gated, monkeypatch):
    case = Case(batch=2, lengths=None, seqlen=37, heads=2, k=16, v=16, initial_state=True, seed=7)
    inputs = [None if t is None else t.detach() for t in _inputs(case, torch.float32, gated)]
    calls = []
    custom = cpu_kernels.FUSED.recurrent_fwd
    monkeypatch.setattr(cpu_kernels, "FUSED", dataclasses.replace(
        cpu_kernels.FUSED, recurrent_fwd=lambda *args: calls.append(args) or custom(*args)))
    with torch.no_grad():
        o, s = _op("cpu", case)(*inputs)
    assert len(calls) == 1
    o_ref, s_ref = _op("oracle", case)(*[None if t is None else t.double() for t in inputs])
    assert_rel(o, o_ref, TOL[torch.float32], "output")
    assert_rel(s, s_ref, TOL[torch.float32], "final state")


def test_automatic_choice_takes_the_cpu_kernels_once_compiled(monkeypatch):
    """Compiled and current: the automatic choice takes them, for float32 and float64; not yet compiled (a
    fresh checkout): the chunked reference, without a compile."""
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = Case(batch=1, lengths=None, seqlen=4, heads=1, k=8, v=8, initial_state=False, seed=1)
    q, k, v, g, beta, _ = make_gated_inputs(case, torch.float32, CPU)
    assert str(explain(gated_delta_rule, q, k, v, g, beta)) == "gated_delta_rule: cpu (CPU tensors)"
    assert explain(delta_rule, *(t.double() for t in (q, k, v, beta))).backend == "cpu"
    half = [t.half() for t in (q, k, v, beta)]
    assert str(explain(delta_rule, *half)) == (
        "delta_rule: reference (CPU tensors; cpu does not take this call: q, k, v, beta must be float32 or float64, "
        "got torch.float16)")
    monkeypatch.setattr(cpu_build, "ready", lambda: False)
    monkeypatch.setattr(cpu_build, "unavailable", lambda: pytest.fail("the automatic choice compiled the kernels"))
    choice = explain(delta_rule, q, k, v, beta)
    assert choice.backend == "reference" and "not compiled here yet" in choice.reason


def test_bad_inputs_raise_clearly():
    case = Case(batch=1, lengths=None, seqlen=4, heads=1, k=8, v=8, initial_state=False, seed=1)
    q, k, v, beta, _ = make_inputs(case, torch.float32, CPU)
    with pytest.raises(BackendUnavailable, match="'cpu' cannot serve this call: q, k, v, beta must be float32"):
        delta_rule(*(t.half() for t in (q, k, v, beta)), backend="cpu")
    wide = torch.randn(1, 4, 1, 129)
    with pytest.raises(BackendUnavailable, match="the value head dim V must be at most 128"):
        delta_rule(q, k, wide, beta, backend="cpu")
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, k, v, beta[:, :3], backend="cpu")
    with pytest.raises(ValueError, match="cu_seqlens"):
        delta_rule(q, k, v, beta, cu_seqlens=torch.tensor([0, 5, 4]), backend="cpu")


@pytest.mark.parametrize("grad", [True, False])
def test_custom_ops_pass_opcheck(grad, monkeypatch):
    """Schema, fake implementations (shapes, dtypes, strides) and autograd registration of the cpu custom ops,
    on the arguments the public op hands them (the forward with checkpoints with gradients, the plain one
    without)."""
    path = "chunk_fwd" if grad else "recurrent_fwd"
    custom, calls = getattr(cpu_kernels.FUSED, path), []
    monkeypatch.setattr(cpu_kernels, "FUSED", dataclasses.replace(
        cpu_kernels.FUSED, **{path: lambda *args: calls.append(args) or custom(*args)}))
    case = Case(batch=2, lengths=None, seqlen=20, heads=2, k=8, v=20, initial_state=True, seed=3)
    inputs = _inputs(case, torch.float32, True)
    if not grad:
        inputs = [t.detach() for t in inputs]
    _op("cpu", case)(*inputs)
    assert len(calls) == 1
    torch.library.opcheck(custom.op, calls[0],
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiled_call_equals_eager():
    """torch.compile(fullgraph=True) traces through the cpu custom ops (aot_eager_decomp_partition, as on CPUs in
    tests/archs/test_compile.py): outputs and gradients equal the eager call's."""
    case = Case(batch=2, lengths=None, seqlen=24, heads=2, k=8, v=8, initial_state=True, seed=6)
    inputs = _inputs(case, torch.float32, True)
    call = _op("cpu", case)

    def loss(*x):
        o, s = call(*x)
        return o.square().sum() + s.sum()

    eager = torch.autograd.grad(loss(*inputs), inputs)
    torch._dynamo.reset()
    compiled = torch.autograd.grad(
        torch.compile(loss, fullgraph=True, backend="aot_eager_decomp_partition")(*inputs), inputs)
    for name, a, b in zip(_names(inputs), compiled, eager, strict=True):
        assert_rel(a, b, 1e-6, f"compiled d{name}")
