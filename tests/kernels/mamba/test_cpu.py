"""The C++ CPU selective scan (backend "cpu") against the float64 recurrence: outputs, final states and the
gradients of every input, the initial state included; packed and ragged sequences, strong decays, channel
blocks, the step sizes from a low-rank factor (delta_proj_weight), and the fallback when the kernels cannot be
built.

The first test to run builds the kernels (once per machine, cached by torch: 1-4 minutes on 2 cores)."""

import dataclasses
import logging
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.kernels import BackendUnavailable, explain
from seqmix.kernels import cpu as cpu_build
from seqmix.kernels.mamba import selective_scan, selective_scan_recurrent
from tests.helpers import TOL, assert_rel, require_cpu_kernels, torch_threads
from tests.kernels.contract import check_against_oracle, outputs_and_grads
from tests.kernels.mamba.cases import Case, cases, make_inputs

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
CPU = torch.device("cpu")


@pytest.fixture
def kernels_built():
    """Skips where the kernels cannot be built here (no compiler or ninja); the fallback tests run anyway."""
    require_cpu_kernels()


built = pytest.mark.usefixtures("kernels_built")


def _float64(case):
    return [None if t is None else t.double().requires_grad_() for t in make_inputs(case, torch.float64, CPU)]


def _check_float64(case, tol=1e-10):
    """Every output and gradient of the cpu backend in float64 equals the recurrence's to ``tol``."""
    inputs = _float64(case)

    def call(fn, *x):
        return fn(*x[:5], **case.kwargs(x), output_final_state=True)

    y, s, grads = outputs_and_grads(partial(call, partial(selective_scan, backend="cpu")), inputs, case.seed)
    y_ref, s_ref, ref_grads = outputs_and_grads(partial(call, selective_scan_recurrent), inputs, case.seed)
    assert y.dtype == s.dtype == torch.float64
    assert_rel(y, y_ref, tol, "output")
    assert_rel(s, s_ref, tol, "final state")
    for name, a, b in zip([n for n, t in zip(NAMES, inputs) if t is not None], grads, ref_grads, strict=True):
        assert_rel(a, b, tol, f"d{name}")
    return y, s


def _check_float32(case, final_state=True):
    inputs = make_inputs(case, torch.float32, CPU, requires_grad=True)
    return check_against_oracle(partial(selective_scan, backend="cpu"), selective_scan_recurrent, NAMES, inputs,
                                case.kwargs, case.seed, torch.float32, final_state)


@built
@settings(max_examples=10, deadline=None)
@given(case=cases(max_t=90, channels=(6, 16, 40), state_dims=(3, 16)))
def test_scan_matches_recurrence_in_float64(case):
    _check_float64(case)


@built
@settings(max_examples=5, deadline=None)
@given(case=cases(max_t=90, channels=(6, 16, 40), state_dims=(3, 16)))
def test_scan_matches_recurrence_in_float32(case):
    _check_float32(case)


@built
@pytest.mark.parametrize("threads", [1, 2])
def test_channel_blocks_and_groups(threads):
    """D = 300, N = 16: more state than one task keeps (two blocks of channels, partial sums of dB and dC);
    groups of 100 channels, which vectors of 16 straddle; a ragged length (not a multiple of the chunk)."""
    with torch_threads(threads):
        _check_float64(Case(batch=1, lengths=None, seqlen=21, channels=300, groups=3, n=16, initial_state=True,
                            extras=True, seed=2))


def _low_rank_inputs(case, rank, dtype):
    """The case's inputs in ``dtype`` with delta replaced by a factor [B, T, rank], and delta_proj_weight [D, rank]
    appended: step sizes of the case's kind (positive without the softplus), all with gradients."""
    inputs = make_inputs(case, dtype, CPU)
    g = torch.Generator().manual_seed(case.seed + 7)
    shape = (*inputs[0].shape[:2], rank)
    if case.extras:  # softplus: any sign
        factor, weight = torch.randn(shape, generator=g), torch.randn(case.channels, rank, generator=g) / rank**0.5
    else:
        factor, weight = torch.rand(shape, generator=g), torch.rand(case.channels, rank, generator=g) * 0.3 / rank
    inputs[1] = factor
    return [None if t is None else t.to(dtype).requires_grad_() for t in [*inputs, weight]]


def _check_low_rank(case, rank, dtype=torch.float64, tol=1e-10):
    """selective_scan with delta_proj_weight on the cpu backend (``dtype``) against the float64 recurrence on the
    step sizes ``F.linear(factor, weight)``: output, final state and every gradient, the factor's and the
    weight's included."""
    inputs = _low_rank_inputs(case, rank, dtype)
    up = [None if t is None else t.detach().double().requires_grad_() for t in inputs]

    def fused(u, factor, A, B, C, D, z, delta_bias, h0, weight):
        kwargs = case.kwargs([u, factor, A, B, C, D, z, delta_bias, h0])
        return selective_scan(u, factor, A, B, C, **kwargs, delta_proj_weight=weight, output_final_state=True,
                              backend="cpu")

    def oracle(u, factor, A, B, C, D, z, delta_bias, h0, weight):
        kwargs = case.kwargs([u, factor, A, B, C, D, z, delta_bias, h0])
        return selective_scan_recurrent(u, F.linear(factor, weight), A, B, C, **kwargs, output_final_state=True)

    y, s, grads = outputs_and_grads(fused, inputs, case.seed)
    y_ref, s_ref, ref_grads = outputs_and_grads(oracle, up, case.seed)
    assert y.dtype == s.dtype == dtype
    assert_rel(y, y_ref, tol, "output")
    assert_rel(s, s_ref, tol, "final state")
    names = [n for n, t in zip([*NAMES, "delta_proj_weight"], inputs) if t is not None]
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert a.dtype == dtype
        assert_rel(a, b, tol, f"d{name}")


@built
@settings(max_examples=8, deadline=None)
@given(case=cases(max_t=90, channels=(6, 16, 40), state_dims=(3, 16)), rank=st.sampled_from([1, 3, 8, 20]))
def test_low_rank_step_sizes_match_recurrence_in_float64(case, rank):
    """delta_proj_weight: the step sizes computed inside from their factor; ranks past the vector width (20)."""
    _check_low_rank(case, rank)


@built
@pytest.mark.parametrize("threads", [1, 2])
def test_low_rank_step_sizes_over_channel_blocks_in_float32(threads):
    """Two blocks of channels (D = 300, N = 16: the factor's gradient summed over them), packed ragged sequences,
    float32 against the float64 recurrence; and without gradients the same output."""
    case = Case(batch=1, lengths=(0, 9, 40, 1), seqlen=50, channels=300, groups=3, n=16, initial_state=True,
                extras=True, seed=6)
    with torch_threads(threads):
        _check_low_rank(case, 8)
        _check_low_rank(case, 8, torch.float32, TOL[torch.float32])
        inputs = [None if t is None else t.detach() for t in _low_rank_inputs(case, 8, torch.float32)]
        kwargs = case.kwargs(inputs[:9])
        y, s = selective_scan(*inputs[:5], **kwargs, delta_proj_weight=inputs[9], output_final_state=True,
                              backend="cpu")
        y_ref, s_ref = selective_scan(inputs[0], F.linear(inputs[1], inputs[9]), *inputs[2:5], **kwargs,
                                      output_final_state=True, backend="cpu")
    assert_rel(y, y_ref, 1e-6, "output without gradients")
    assert_rel(s, s_ref, 1e-6, "final state without gradients")


def test_low_rank_step_sizes_bad_input():
    case = Case(batch=2, lengths=None, seqlen=5, channels=6, groups=None, n=3, initial_state=False, extras=False,
                seed=1)
    u, factor, A, B, C, *_ , weight = _low_rank_inputs(case, 4, torch.float32)
    with pytest.raises(ValueError, match="delta_proj_weight"):
        selective_scan(u, factor, A, B, C, delta_proj_weight=weight[:5])
    with pytest.raises(ValueError, match="delta"):
        selective_scan(u, factor[..., :3], A, B, C, delta_proj_weight=weight)
    with pytest.raises(ValueError, match="delta"):
        selective_scan(u, factor, A, B, C)  # a factor without its weight
    with pytest.raises(ValueError, match="R >= 1"):
        selective_scan(u, factor[..., :0], A, B, C, delta_proj_weight=weight[:, :0])


@built
def test_packed_sequences_with_empty_ones_keep_their_states():
    case = Case(batch=1, lengths=(0, 9, 0, 35, 1), seqlen=45, channels=24, groups=2, n=5, initial_state=True,
                extras=True, seed=5)
    _, s = _check_float64(case)
    h0 = _float64(case)[8]
    torch.testing.assert_close(s[0], h0[0])
    torch.testing.assert_close(s[2], h0[2])
    _check_float32(case, final_state=False)


@built
def test_strong_decay_stays_finite_in_float32():
    """delta' A down to about -20 per step (exp underflows in float32), across chunks and a sequence boundary."""
    case = Case(batch=1, lengths=(40, 30), seqlen=70, channels=20, groups=None, n=16, initial_state=True,
                extras=False, seed=21, decay=40.0)
    y, s = _check_float32(case)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decays_at_the_ends_of_their_range(dtype):
    """The decays 2^(delta' A log2 e) (vec_cpu.h's exp2_v) where their range ends: delta' = 0 decays by exactly 1
    (B zero: the final state is the initial one, bit for bit), delta' A far below the smallest normal decays to
    exactly 0 (the state is the last token's input, as in float64), and a NaN in delta reaches its channel's
    outputs from its token on and no other channel's."""
    g = torch.Generator().manual_seed(3)
    T, Dm, N = 37, 20, 16
    u, C = torch.randn(1, T, Dm, generator=g, dtype=dtype), torch.randn(1, T, N, generator=g, dtype=dtype)
    A = -torch.rand(Dm, N, generator=g, dtype=dtype) - 0.5
    h0 = torch.randn(1, Dm, N, generator=g, dtype=dtype)
    zeros = torch.zeros(1, T, Dm, dtype=dtype)
    _, s = selective_scan(u, zeros, A, torch.zeros(1, T, N, dtype=dtype), C, initial_state=h0,
                          output_final_state=True, backend="cpu")
    assert torch.equal(s, h0)

    B = torch.randn(1, T, N, generator=g, dtype=dtype)
    big = torch.full((1, T, Dm), 2000.0, dtype=dtype)  # delta' A <= -1000: below 2^-125 and 2^-1021
    _, s = selective_scan(u, big, A, B, C, initial_state=h0, output_final_state=True, backend="cpu")
    torch.testing.assert_close(s[0], big[0, -1, :, None] * u[0, -1, :, None] * B[0, -1], rtol=0, atol=0)

    delta = torch.rand(1, T, Dm, generator=g, dtype=dtype)
    delta[0, 11, 4] = float("nan")
    y, _ = selective_scan(u, delta, A, B, C, initial_state=h0, backend="cpu")
    assert torch.isnan(y[0, 11:, 4]).all()
    assert torch.isfinite(y[0, :11]).all() and torch.isfinite(y[0, :, torch.arange(Dm) != 4]).all()


@built
def test_without_gradients_the_forward_stores_no_chunk_states():
    case = Case(batch=2, lengths=None, seqlen=33, channels=16, groups=1, n=4, initial_state=True, extras=True, seed=7)
    inputs = make_inputs(case, torch.float32, CPU)
    with torch.no_grad():
        y, s = selective_scan(*inputs[:5], **case.kwargs(inputs), output_final_state=True, backend="cpu")
    up = [None if t is None else t.double() for t in inputs]
    y_ref, s_ref = selective_scan_recurrent(*up[:5], **case.kwargs(up), output_final_state=True)
    assert_rel(y, y_ref, TOL[torch.float32], "output")
    assert_rel(s, s_ref, TOL[torch.float32], "final state")


@built
def test_float64_initial_state_keeps_its_precision():
    """The float64 path takes the initial state in float64 (not through float32) and returns it so."""
    case = Case(batch=1, lengths=None, seqlen=3, channels=4, groups=None, n=3, initial_state=True, extras=False,
                seed=4)
    inputs = _float64(case)
    inputs[8] = inputs[8].detach() + 1e-12  # digits float32 would drop
    _check_float64(case)
    _, s = selective_scan(*inputs[:5], initial_state=inputs[8], output_final_state=True, backend="cpu")
    _, s_ref = selective_scan_recurrent(*inputs[:5], initial_state=inputs[8], output_final_state=True)
    assert_rel(s, s_ref, 1e-14, "final state")


@built
def test_automatic_choice_on_cpu_tensors_is_the_cpu_kernel(monkeypatch):
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    case = Case(batch=1, lengths=None, seqlen=4, channels=4, groups=None, n=3, initial_state=False, extras=False,
                seed=1)
    inputs = make_inputs(case, torch.float32, CPU)
    assert str(explain(selective_scan, *inputs[:5])) == "selective_scan: cpu (CPU tensors)"
    assert explain(selective_scan, *[t.double() for t in inputs[:5]]).backend == "cpu"
    monkeypatch.setenv("SEQMIX_BACKEND", "reference")
    assert explain(selective_scan, *inputs[:5]).backend == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("SEQMIX_BACKEND")
    half = [t.half() for t in inputs[:5]]
    assert str(explain(selective_scan, *half)) == (
        "selective_scan: reference (CPU tensors; cpu does not take this call: u, delta, B, C must be float32 or "
        "float64, got torch.float16)")
    with pytest.raises(BackendUnavailable, match="'cpu' cannot serve this call: u, delta, B, C must be float32"):
        selective_scan(*half, backend="cpu")


def test_a_failed_build_falls_back_to_the_reference_and_says_why(monkeypatch, caplog):
    """No ninja (or compiler): nothing raises, the automatic choice takes the reference, explain and a named
    backend say why; the failure is logged once."""
    monkeypatch.setattr(cpu_build, "_tried", False)
    monkeypatch.setattr(cpu_build, "_reason", "not built yet")
    monkeypatch.setattr(cpu_build, "_module", None)

    def no_ninja(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\n(more lines)")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_ninja)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    case = Case(batch=1, lengths=None, seqlen=4, channels=4, groups=None, n=3, initial_state=False, extras=False,
                seed=1)
    inputs = make_inputs(case, torch.float32, CPU)
    why = "the C++ CPU kernels could not be built: Ninja is required to load C++ extensions"
    with caplog.at_level(logging.WARNING, logger="seqmix.kernels"):
        assert str(explain(selective_scan, *inputs[:5])) == f"selective_scan: reference (CPU tensors; cpu: {why})"
        y, _ = selective_scan(*inputs[:5])
    assert [r.getMessage() for r in caplog.records].count(f"seqmix: {why}; the PyTorch references serve CPU calls") == 1
    y_ref, _ = selective_scan_recurrent(*[t.double() for t in inputs[:5]])
    assert_rel(y, y_ref, TOL[torch.float32], "output of the fallback")
    with pytest.raises(BackendUnavailable, match=re.escape(f"'cpu' cannot serve this call: {why}")):
        selective_scan(*inputs[:5], backend="cpu")


def test_cpu_backend_needs_cpu_tensors():
    from seqmix.kernels.backend import select_backend

    with pytest.raises(BackendUnavailable, match=r"the C\+\+ CPU kernels need CPU tensors \(got cuda\)"):
        select_backend("op", "cpu", torch.device("cuda"), ("cpu", "reference"))


@built
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("low_rank", [False, True])
def test_custom_ops_pass_opcheck(grad, low_rank, monkeypatch):
    """Schema, fake implementations (shapes, dtypes, strides) and autograd registration of the cpu custom ops,
    on the arguments the public op hands them (the chunked forward with gradients, the plain one without), with
    the step sizes given or from a low-rank factor."""
    from seqmix.kernels.mamba import cpu as cpu_kernels

    path = "chunk_fwd" if grad else "recurrent_fwd"
    custom, calls = getattr(cpu_kernels.FUSED, path), []
    monkeypatch.setattr(cpu_kernels, "FUSED", dataclasses.replace(
        cpu_kernels.FUSED, **{path: lambda *args: calls.append(args) or custom(*args)}))
    case = Case(batch=2, lengths=None, seqlen=20, channels=6, groups=2, n=3, initial_state=True, extras=True, seed=3)
    if low_rank:
        *inputs, weight = [t.detach().requires_grad_(grad) for t in _low_rank_inputs(case, 3, torch.float32)]
    else:
        inputs, weight = make_inputs(case, torch.float32, CPU, requires_grad=grad), None
    selective_scan(*inputs[:5], **case.kwargs(inputs), delta_proj_weight=weight, output_final_state=True,
                   backend="cpu")
    assert len(calls) == 1
    torch.library.opcheck(custom.op, calls[0],
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@built
def test_compiled_call_equals_eager():
    """torch.compile(fullgraph=True) traces through the cpu custom ops (aot_eager_decomp_partition, as on CPUs in
    tests/archs/test_compile.py): outputs and gradients equal the eager call's."""
    case = Case(batch=2, lengths=None, seqlen=24, channels=16, groups=None, n=4, initial_state=True, extras=True,
                seed=6)
    inputs = make_inputs(case, torch.float32, CPU, requires_grad=True)

    def loss(*x):
        y, s = selective_scan(*x[:5], **case.kwargs(x), output_final_state=True, backend="cpu")
        return y.square().sum() + s.sum()

    wrt = [t for t in inputs if t is not None]
    eager = torch.autograd.grad(loss(*inputs), wrt)
    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager_decomp_partition")(*inputs),
                                   wrt)
    for name, a, b in zip([n for n, t in zip(NAMES, inputs) if t is not None], compiled, eager, strict=True):
        assert_rel(a, b, 1e-6, f"compiled d{name}")


@built
def test_a_compiled_first_call_builds_the_kernels_and_takes_them(monkeypatch):
    """torch.compile traces a call before any eager one asked for the kernels: the build runs during the trace
    (its result a constant of the graph), and the graph calls the C++ kernels."""
    from seqmix.kernels.mamba import cpu as cpu_kernels

    monkeypatch.setattr(cpu_build, "_tried", False)
    monkeypatch.setattr(cpu_build, "_reason", "not built yet")
    monkeypatch.setattr(cpu_build, "_module", None)
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    traced = []
    chunk_fwd = cpu_kernels.FUSED.chunk_fwd
    monkeypatch.setattr(cpu_kernels, "FUSED", dataclasses.replace(
        cpu_kernels.FUSED, chunk_fwd=lambda *args: traced.append(args) or chunk_fwd(*args)))
    case = Case(batch=1, lengths=None, seqlen=8, channels=4, groups=None, n=3, initial_state=False, extras=False,
                seed=2)
    inputs = make_inputs(case, torch.float32, CPU, requires_grad=True)
    torch._dynamo.reset()
    y = torch.compile(lambda *x: selective_scan(*x)[0], fullgraph=True, backend="aot_eager_decomp_partition")(
        *inputs[:5])
    assert traced and cpu_build._tried and cpu_build._reason is None
    y_ref, _ = selective_scan_recurrent(*[t.detach().double() for t in inputs[:5]])
    assert_rel(y, y_ref, TOL[torch.float32], "output")


def test_without_a_compiler_a_fresh_process_falls_back_and_says_why(tmp_path):
    """A real failed build (the compiler does not exist, an empty cache): the op still runs, on the reference."""
    script = (
        "import torch\n"
        "from seqmix.kernels import explain\n"
        "from seqmix.kernels.mamba import selective_scan\n"
        "u, d, B = torch.randn(1, 4, 4), torch.rand(1, 4, 4), torch.randn(1, 4, 3)\n"
        "A = -torch.rand(4, 3) - 0.1\n"
        "print(explain(selective_scan, u, d, A, B, B))\n"
        "print(selective_scan(u, d, A, B, B)[0].shape)\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env.pop("SEQMIX_BACKEND", None)
    env["TRITON_INTERPRET"] = "0"
    done = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[3])
    assert done.returncode == 0, done.stderr
    explained, shape = done.stdout.strip().splitlines()[-2:]
    assert explained.startswith("selective_scan: reference (CPU tensors; cpu: the C++ CPU kernels could not be "
                                "built: Error building extension")
    assert "no-such-compiler: not found" in explained
    assert shape == "torch.Size([1, 4, 4])"


@built
@pytest.mark.parametrize("used", ["output", "final state"])
def test_gradients_through_one_output_only(used):
    """A loss on the output alone or on the final state alone (the other output's gradient is None, not a
    tensor of zeros): every gradient equals the float64 recurrence's."""
    case = Case(batch=2, lengths=None, seqlen=37, channels=24, groups=2, n=5, initial_state=True, extras=True,
                seed=11)
    grads = []
    for fn in (partial(selective_scan, backend="cpu"), selective_scan_recurrent):
        inputs = _float64(case)
        y, s = fn(*inputs[:5], **case.kwargs(inputs), output_final_state=True)
        loss = y if used == "output" else s
        weights = torch.randn(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(3))
        wrt = [t for t in inputs if t is not None]
        found = torch.autograd.grad((loss * weights).sum(), wrt, allow_unused=True)
        grads.append([torch.zeros_like(t) if g is None else g for g, t in zip(found, wrt)])  # dz: the state's
    for name, a, b in zip([n for n, t in zip(NAMES, inputs) if t is not None], *grads, strict=True):
        assert_rel(a, b, 1e-10, f"d{name}")
