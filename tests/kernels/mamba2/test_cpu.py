"""The C++ CPU SSD (backend "cpu") against the float64 recurrence: outputs, final states and the gradients of every
input (x, dt, A, B, C, D, z, dt_bias, the initial state); groups, packed sequences with empty ones, lengths that
are not a multiple of the chunk, one token, strong decays, dt limits, the custom ops under opcheck and
torch.compile, the automatic choice, and bad input. Then ``ssd_xbc`` (x, B and C as the column blocks of one
tensor, read in place, one gradient) and ``ssd_zxbcdt`` (z, x, B, C and dt as the column blocks of Mamba-2's
in_proj output) against the same recurrence.

The first test to run builds the kernels (once per machine, cached by torch: 1-4 minutes on 2 cores)."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.kernels import BackendUnavailable, causal_conv1d, explain, ssd, ssd_xbc, ssd_zxbcdt
from seqmix.kernels import cpu as cpu_build
from seqmix.kernels import mamba2 as mamba2_ops
from seqmix.kernels.mamba2 import cpu as cpu_kernels
from seqmix.kernels.mamba2 import ssd_recurrent
from seqmix.kernels.norm import rms_norm
from tests.helpers import TOL, assert_rel, require_cpu_kernels, torch_threads
from tests.kernels.mamba2.cases import Case, cases, make_inputs

CPU = torch.device("cpu")
NORM_EPS = 1e-5
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


@pytest.fixture(autouse=True)
def kernels_built():
    require_cpu_kernels()


def _inputs(case, dtype):
    """The case's inputs in ``dtype`` (parameters and state included), with gradients."""
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in make_inputs(case, dtype, CPU)]


def _run(backend, case, inputs, final_state=True, **options):
    """(y, final state, gradients of the inputs that are not None) for a loss with random weights on both."""
    kwargs = {**case.kwargs(inputs), **options, "output_final_state": final_state}
    if backend == "oracle":
        y, s = ssd_recurrent(*inputs[:5], **kwargs)
    else:
        y, s = ssd(*inputs[:5], **kwargs, backend="cpu")
    gen = torch.Generator().manual_seed(case.seed + 1)  # the same weights for every dtype
    loss = (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)).sum()
    if final_state:
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)).sum()
    return y, s, torch.autograd.grad(loss, [t for t in inputs if t is not None])


def _check(case, dtype=torch.float64, tol=1e-10, final_state=True, **options):
    """The cpu backend in ``dtype`` against the recurrence in float64 on the same inputs."""
    inputs = _inputs(case, dtype)
    up = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    y, s, grads = _run("cpu", case, inputs, final_state, **options)
    y_ref, s_ref, ref_grads = _run("oracle", case, up, final_state, **options)
    assert y.dtype == dtype
    assert_rel(y, y_ref, tol, "output")
    if final_state:
        assert s.dtype == dtype
        assert_rel(s, s_ref, tol, "final state")
    else:
        assert s is None
    names = [n for n, t in zip(NAMES, inputs) if t is not None]
    for name, a, b, t in zip(names, grads, ref_grads, [t for t in inputs if t is not None], strict=True):
        assert a.dtype == t.dtype
        assert torch.isfinite(a).all(), f"d{name} is not finite"
        assert_rel(a, b, tol, f"d{name}")
    return y, s


@settings(max_examples=8, deadline=None)
@given(case=cases(max_t=150))
def test_matches_recurrence_in_float64(case):
    _check(case)


@settings(max_examples=4, deadline=None)
@given(case=cases(max_t=150))
def test_matches_recurrence_in_float32(case):
    _check(case, torch.float32, TOL[torch.float32])


def test_one_token_and_a_partial_chunk():
    """T = 1 (no state passes between chunks); 130 tokens = two chunks of 64 and two tokens, with heads of
    width 70 (not a multiple of the vector lanes)."""
    _check(Case(batch=3, lengths=None, seqlen=1, heads=2, groups=1, p=8, n=5, initial_state=True, extras=True,
                seed=1))
    _check(Case(batch=1, lengths=None, seqlen=130, heads=2, groups=2, p=70, n=9, initial_state=False, extras=True,
                seed=2))


@pytest.mark.parametrize("threads", [1, 2])
def test_packed_sequences_with_empty_ones_keep_their_states(threads):
    """Ragged packed sequences (empty ones among them), on one thread and on two (tasks of unequal length)."""
    case = Case(batch=1, lengths=(0, 9, 0, 135, 1), seqlen=145, heads=4, groups=2, p=8, n=16, initial_state=True,
                extras=True, seed=5)
    with torch_threads(threads):
        _, s = _check(case)
        h0 = _inputs(case, torch.float64)[8]
        torch.testing.assert_close(s[0], h0[0])
        torch.testing.assert_close(s[2], h0[2])
        _check(case, torch.float32, TOL[torch.float32], final_state=False)


def test_strong_decays_stay_finite_in_float32():
    """dt' A around -20 to -60 per token: exp underflows to 0 within a chunk, where a factored form's exp(-lcum)
    would overflow; every gradient finite and equal to the float64 recurrence's."""
    case = Case(batch=2, lengths=None, seqlen=100, heads=2, groups=1, p=4, n=8, initial_state=True, extras=False,
                seed=4, log_decay=40.0)
    _check(case)
    y, s = _check(case, torch.float32, TOL[torch.float32])
    assert torch.isfinite(y).all() and torch.isfinite(s).all()


@pytest.mark.parametrize("flush", [False, True])
def test_decays_through_the_denormal_range_keep_the_callers_mode(flush):
    """dt' |A| of a few per token: a chunk's decays pass below float32's smallest normal, where the kernels
    flush denormals to zero (vec_cpu.h's FlushDenormals). The results are still the float64 recurrence's, and
    the calling thread's own mode is what it was, flushing or not."""
    case = Case(batch=2, lengths=None, seqlen=150, heads=2, groups=1, p=16, n=8, initial_state=True, extras=False,
                seed=6, log_decay=3.0)
    denormal = torch.tensor([1e-39])
    assert denormal.item() != 0.0
    assert torch.set_flush_denormal(flush)
    try:
        _check(case, torch.float32, TOL[torch.float32])
        assert ((denormal * 1.0).item() == 0.0) == flush
    finally:
        torch.set_flush_denormal(False)


def test_dt_limits_clamp_and_stop_gradients():
    """Without softplus, dt' = clamp(dt + dt_bias, lo, hi): tokens outside the limits get no dt gradient."""
    case = Case(batch=2, lengths=None, seqlen=70, heads=2, groups=1, p=4, n=6, initial_state=True, extras=False,
                seed=9)
    _check(case, dt_limit=(0.2, 0.4))
    _check(case, dt_limit=(0.0, math.inf))


def test_gradients_through_the_final_state_alone():
    """A loss on the final state only: no output gradient reaches the backward (it runs on zeros); C, D and z,
    which only the outputs read, get zero gradients."""
    case = Case(batch=2, lengths=None, seqlen=90, heads=2, groups=1, p=4, n=6, initial_state=True, extras=True,
                seed=11)
    inputs = _inputs(case, torch.float64)
    kw = case.kwargs(inputs)
    weight = torch.randn(2, 2, 4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    wanted = [t for t in inputs if t is not None]
    _, s = ssd(*inputs[:5], **kw, output_final_state=True, backend="cpu")
    grads = torch.autograd.grad((s * weight).sum(), wanted, allow_unused=True)
    _, s_ref = ssd_recurrent(*inputs[:5], **kw, output_final_state=True)
    ref_grads = torch.autograd.grad((s_ref * weight).sum(), wanted, allow_unused=True)
    for name, a, b in zip([n for n, t in zip(NAMES, inputs) if t is not None], grads, ref_grads, strict=True):
        if name in ("C", "D", "z"):
            assert torch.equal(a, torch.zeros_like(a)) and b is None, name
        else:
            assert_rel(a, b, 1e-10, f"d{name}")


def test_without_gradients_the_forward_stores_nothing(monkeypatch):
    case = Case(batch=2, lengths=None, seqlen=100, heads=2, groups=1, p=8, n=16, initial_state=True, extras=True,
                seed=7)
    inputs = [None if t is None else t.detach() for t in make_inputs(case, torch.float32, CPU)]
    calls = []
    custom = cpu_kernels.FUSED.recurrent_fwd
    monkeypatch.setattr(cpu_kernels, "FUSED", dataclasses.replace(
        cpu_kernels.FUSED, recurrent_fwd=lambda *args: calls.append(args) or custom(*args)))
    kw = case.kwargs(inputs)
    with torch.no_grad():
        y, s = ssd(*inputs[:5], **kw, output_final_state=True, backend="cpu")
    assert len(calls) == 1
    y_ref, s_ref = ssd_recurrent(*[None if t is None else t.double() for t in inputs[:5]],
                                 **case.kwargs([None if t is None else t.double() for t in inputs]),
                                 output_final_state=True)
    assert_rel(y, y_ref, TOL[torch.float32], "output")
    assert_rel(s, s_ref, TOL[torch.float32], "final state")


def test_automatic_choice_takes_the_cpu_kernels_once_compiled(monkeypatch):
    """Compiled and current: the automatic choice takes them, for float32 and float64; not yet compiled (a
    fresh checkout): the chunked reference, without a compile."""
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = Case(batch=1, lengths=None, seqlen=4, heads=2, groups=1, p=4, n=4, initial_state=False, extras=False,
                seed=1)
    x, dt, A, B, C = make_inputs(case, torch.float32, CPU)[:5]
    assert str(explain(ssd, x, dt, A, B, C)) == "ssd: cpu (CPU tensors)"
    assert explain(ssd, x.double(), dt.double(), A, B.double(), C.double()).backend == "cpu"
    assert str(explain(ssd, x.half(), dt.half(), A, B.half(), C.half())) == (
        "ssd: reference (CPU tensors; cpu does not take this call: x, dt, B, C must be float32 or float64, "
        "got torch.float16)")
    monkeypatch.setattr(cpu_build, "ready", lambda: False)
    monkeypatch.setattr(cpu_build, "unavailable", lambda: pytest.fail("the automatic choice compiled the kernels"))
    choice = explain(ssd, x, dt, A, B, C)
    assert choice.backend == "reference" and "not compiled here yet" in choice.reason


def test_bad_inputs_raise_clearly():
    case = Case(batch=1, lengths=None, seqlen=4, heads=2, groups=1, p=4, n=4, initial_state=False, extras=False,
                seed=1)
    x, dt, A, B, C = make_inputs(case, torch.float32, CPU)[:5]
    with pytest.raises(BackendUnavailable, match="'cpu' cannot serve this call: x, dt, B, C must be float32"):
        ssd(x.half(), dt.half(), A, B.half(), C.half(), backend="cpu")
    with pytest.raises(ValueError, match="dt"):
        ssd(x, dt[:, :3], A, B, C, backend="cpu")
    with pytest.raises(ValueError, match="cu_seqlens"):
        ssd(x, dt, A, B, C, cu_seqlens=torch.tensor([0, 5, 4]), backend="cpu")


@pytest.mark.parametrize("grad", [True, False])
def test_custom_ops_pass_opcheck(grad, monkeypatch):
    """Schema, fake implementations (shapes, dtypes, strides) and autograd registration of the cpu custom ops,
    on the arguments the public op hands them (the forward that stores for a backward with gradients, the
    plain one without)."""
    path = "chunk_fwd" if grad else "recurrent_fwd"
    custom, calls = getattr(cpu_kernels.FUSED, path), []
    monkeypatch.setattr(cpu_kernels, "FUSED", dataclasses.replace(
        cpu_kernels.FUSED, **{path: lambda *args: calls.append(args) or custom(*args)}))
    case = Case(batch=2, lengths=None, seqlen=70, heads=2, groups=1, p=4, n=6, initial_state=True, extras=True,
                seed=3)
    inputs = _inputs(case, torch.float32)
    if not grad:
        inputs = [None if t is None else t.detach() for t in inputs]
    ssd(*inputs[:5], **case.kwargs(inputs), output_final_state=True, backend="cpu")
    assert len(calls) == 1
    torch.library.opcheck(custom.op, calls[0],
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiled_call_equals_eager():
    """torch.compile(fullgraph=True) traces through the cpu custom ops (aot_eager_decomp_partition, as on CPUs in
    tests/archs/test_compile.py): outputs and gradients equal the eager call's."""
    case = Case(batch=2, lengths=None, seqlen=70, heads=2, groups=1, p=4, n=6, initial_state=True, extras=True,
                seed=6)
    inputs = _inputs(case, torch.float32)
    present = [t for t in inputs if t is not None]

    def loss(*tensors):
        it = iter(tensors)
        full = [None if t is None else next(it) for t in inputs]
        y, s = ssd(*full[:5], **case.kwargs(full), output_final_state=True, backend="cpu")
        return y.square().sum() + s.sum()

    eager = torch.autograd.grad(loss(*present), present)
    torch._dynamo.reset()
    compiled = torch.autograd.grad(
        torch.compile(loss, fullgraph=True, backend="aot_eager_decomp_partition")(*present), present)
    for name, a, b in zip([n for n, t in zip(NAMES, inputs) if t is not None], compiled, eager, strict=True):
        assert_rel(a, b, 1e-6, f"compiled d{name}")


def _xbc_run(case, inputs, final_state=True):
    """:func:`_run` through ssd_xbc on the cpu backend: x, B and C concatenated into one leaf xbc; returns the
    gradients in the order of :func:`_run`'s, with xbc's split back into those of x, B and C."""
    x, dt, A, B, C = inputs[:5]
    H, P = x.shape[2:]
    G, N = B.shape[2:]
    xbc = torch.cat([x.detach().flatten(2), B.detach().flatten(2), C.detach().flatten(2)], -1).requires_grad_()
    kwargs = {**case.kwargs(inputs), "output_final_state": final_state}
    y, s = ssd_xbc(xbc, dt, A, num_heads=H, n_groups=G, d_state=N, **kwargs, backend="cpu")
    gen = torch.Generator().manual_seed(case.seed + 1)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)).sum()
    if final_state:
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)).sum()
    others = [t for t in [dt, A, *inputs[5:]] if t is not None]
    dxbc, ddt, dA, *rest = torch.autograd.grad(loss, [xbc, *others])
    dx, dB, dC = dxbc.split([H * P, G * N, G * N], -1)
    grads = [dx.unflatten(-1, (H, P)), ddt, dA, dB.unflatten(-1, (G, N)), dC.unflatten(-1, (G, N)), *rest]
    return y, s, grads


def _check_xbc(case, dtype=torch.float64, tol=1e-10):
    inputs = _inputs(case, dtype)
    up = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    y, s, grads = _xbc_run(case, inputs)
    y_ref, s_ref, ref_grads = _run("oracle", case, up)
    assert y.dtype == dtype and s.dtype == dtype
    assert_rel(y, y_ref, tol, "output")
    assert_rel(s, s_ref, tol, "final state")
    names = [n for n, t in zip(NAMES, inputs) if t is not None]
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert a.dtype == dtype
        assert_rel(a, b, tol, f"d{name}")


@settings(max_examples=6, deadline=None)
@given(case=cases(max_t=150))
def test_xbc_matches_recurrence_in_float64(case):
    _check_xbc(case)


def test_xbc_in_float32_with_packed_sequences_and_partial_chunks():
    """Ragged packed sequences with an initial state, 135 tokens in the longest (two chunks and a part), heads of
    width 70 (not a multiple of the vector lanes)."""
    _check_xbc(Case(batch=1, lengths=(0, 9, 135, 1), seqlen=145, heads=4, groups=2, p=70, n=16, initial_state=True,
                    extras=True, seed=5), torch.float32, TOL[torch.float32])


def test_xbc_takes_a_dense_batch_of_at_most_whole_chunk_tokens_as_one_chunk(monkeypatch):
    """Dense batches of CHUNK < T <= WHOLE_CHUNK tokens per sequence run in chunks of WHOLE_CHUNK (one per
    sequence), shorter and longer ones in chunks of CHUNK: each agrees with the float64 recurrence, with and
    without the conv inside, gradients included."""
    custom, chunks = cpu_kernels.XBC_FUSED.chunk_fwd, []
    # The options end with the chunk, norm_eps, in_proj and store_final.
    monkeypatch.setattr(cpu_kernels, "XBC_FUSED", dataclasses.replace(
        cpu_kernels.XBC_FUSED, chunk_fwd=lambda *args: chunks.append(args[-4]) or custom(*args)))
    whole, chunk = cpu_kernels.WHOLE_CHUNK, cpu_kernels.CHUNK
    for seqlen, expected in ((chunk + 1, whole), (whole, whole), (chunk, chunk), (whole + 3, chunk)):
        chunks.clear()
        case = Case(batch=2, lengths=None, seqlen=seqlen, heads=2, groups=1, p=8, n=16, initial_state=True,
                    extras=True, seed=seqlen)
        _check_xbc(case)
        _check_conv(case)
        assert chunks == [expected, expected], seqlen


def test_xbc_takes_the_in_place_kernels_with_gradients_only(monkeypatch):
    """With autograd: one call of the xbc ops (opcheck'ed) and no copy of x, B or C; without: ``ssd`` on views."""
    custom, calls = cpu_kernels.XBC_FUSED.chunk_fwd, []
    monkeypatch.setattr(cpu_kernels, "XBC_FUSED", dataclasses.replace(
        cpu_kernels.XBC_FUSED, chunk_fwd=lambda *args: calls.append(args) or custom(*args)))
    case = Case(batch=2, lengths=None, seqlen=70, heads=2, groups=1, p=4, n=6, initial_state=True, extras=True,
                seed=3)
    inputs = _inputs(case, torch.float32)
    _xbc_run(case, inputs)
    assert len(calls) == 1
    xbc = calls[0][0]
    assert xbc.shape == (140, 2 * 4 + 2 * 6)
    torch.library.opcheck(custom.op, calls[0],
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with torch.no_grad():
        y, _ = ssd_xbc(xbc.view(2, 70, -1), *[t.detach() for t in inputs[1:3]], num_heads=2, n_groups=1, d_state=6,
                       backend="cpu")
    assert len(calls) == 1 and y.shape == (2, 70, 2, 4)


def _conv_run(case, dtype, width, bias, fused, norm=False, in_proj=False):
    """y, the final state and the gradients (xbc, dt, A, the case's others, conv weight, conv bias, with norm the
    norm's weight) of ssd_xbc on the conv's input xbc with the conv inside (fused, cpu backend, ``dtype``), or of
    the float64 oracle: the reference conv, then the recurrence on its output's column blocks (then, with norm,
    an RMSNorm over each token's H P values written out in float64). With in_proj (fused, a case with z), of
    ssd_zxbcdt on z, xbc and dt concatenated into one leaf, its gradient split back into theirs."""
    inputs = _inputs(case, dtype if fused else torch.float64)
    x, dt, A, B = inputs[:4]
    H, P = x.shape[2:]
    G, N = B.shape[2:]
    D_total = H * P + 2 * G * N
    gen = torch.Generator().manual_seed(case.seed + 2)
    xbc = torch.randn(*x.shape[:2], D_total, generator=gen, dtype=torch.float64).to(x.dtype).requires_grad_()
    weight = (torch.randn(D_total, width, generator=gen, dtype=torch.float64) * 0.5).to(x.dtype).requires_grad_()
    conv_bias = (torch.randn(D_total, generator=gen, dtype=torch.float64) * 0.5).to(x.dtype).requires_grad_()
    conv_bias = conv_bias if bias else None
    norm_weight = (torch.rand(H * P, generator=gen, dtype=torch.float64) + 0.5).to(x.dtype).requires_grad_()
    norm_weight = norm_weight if norm else None
    kwargs = {**case.kwargs(inputs), "output_final_state": True}
    if in_proj:
        return _in_proj_run(xbc, inputs, kwargs, gen, weight, conv_bias, norm_weight)
    if fused:
        y, s = ssd_xbc(xbc, dt, A, num_heads=H, n_groups=G, d_state=N, **kwargs, backend="cpu", conv_weight=weight,
                       conv_bias=conv_bias, norm_weight=norm_weight, norm_eps=NORM_EPS)
    else:
        act = causal_conv1d(xbc, weight, conv_bias, activation="silu", cu_seqlens=kwargs["cu_seqlens"],
                            backend="reference")[0]
        xs, Bs, Cs = act.split([H * P, G * N, G * N], -1)
        y, s = ssd_recurrent(xs.unflatten(-1, (H, P)), dt, A, Bs.unflatten(-1, (G, N)), Cs.unflatten(-1, (G, N)),
                             **kwargs)
        if norm:
            rows = y.flatten(-2)
            y = (rows * (rows.square().mean(-1, keepdim=True) + NORM_EPS).rsqrt() * norm_weight).view(y.shape)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)).sum()
    leaves = [t for t in [xbc, dt, A, *inputs[5:], weight, conv_bias, norm_weight] if t is not None]
    return y, s, torch.autograd.grad(loss, leaves)


def _in_proj_run(xbc, inputs, kwargs, gen, weight, conv_bias, norm_weight):
    """_conv_run's fused results through ssd_zxbcdt: the same draws, the gradients in the same order."""
    x, dt, A, B = inputs[:4]
    H, P = x.shape[2:]
    G, N = B.shape[2:]
    z = kwargs.pop("z")
    zxbcdt = torch.cat([z.detach().flatten(2), xbc.detach(), dt.detach()], -1).requires_grad_()
    y, s = ssd_zxbcdt(zxbcdt, A, num_heads=H, n_groups=G, d_state=N, **kwargs, backend="cpu", conv_weight=weight,
                      conv_bias=conv_bias, norm_weight=norm_weight, norm_eps=NORM_EPS)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)).sum()
    D, dt_bias, h0 = inputs[5], inputs[7], inputs[8]
    leaves = [t for t in [zxbcdt, A, D, dt_bias, h0, weight, conv_bias, norm_weight] if t is not None]
    dzxbcdt, dA, dD, ddt_bias, *rest = torch.autograd.grad(loss, leaves)
    dz, dxbc, ddt = dzxbcdt.split([H * P, xbc.shape[-1], H], -1)
    return y, s, (dxbc, ddt, dA, dD, dz.unflatten(-1, (H, P)), ddt_bias, *rest)


def _check_conv(case, width=4, bias=True, dtype=torch.float64, tol=1e-10, norm=False, in_proj=False):
    y, s, grads = _conv_run(case, dtype, width, bias, fused=True, norm=norm, in_proj=in_proj)
    y_ref, s_ref, ref_grads = _conv_run(case, dtype, width, bias, fused=False, norm=norm)
    assert y.dtype == dtype and s.dtype == dtype
    assert_rel(y, y_ref, tol, "output")
    assert_rel(s, s_ref, tol, "final state")
    names = ["xbc", "dt", "A", "D", "z", "dt_bias", "initial_state", "conv_weight", "conv_bias", "norm_weight"]
    present = [True, True, True, *[case.extras] * 3, case.initial_state, True, bias, norm]
    for name, a, b in zip([n for n, there in zip(names, present) if there], grads, ref_grads, strict=True):
        assert_rel(a, b, tol, f"d{name}")


@settings(max_examples=6, deadline=None)
@given(case=cases(max_t=150), width=st.sampled_from([1, 3, 4]), bias=st.booleans())
def test_conv_inside_matches_conv_then_recurrence_in_float64(case, width, bias):
    """The short conv computed inside the chunks: output, final state and every gradient (the conv's input,
    weight and bias included) equal to the reference conv followed by the float64 recurrence."""
    _check_conv(case, width, bias)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5])
def test_conv_inside_every_width_by_blocks_and_single_tokens(width):
    """Each width of the conv inside (up to 4 taken 4 tokens at a time past a sequence's first W-1 tokens, the
    chunk's last few and wider convs token by token): sequences of lengths that leave 0-3 tokens after the
    blocks, and ones shorter than the window; float64 against the reference conv and recurrence."""
    case = Case(batch=1, lengths=(3, 70, 1, 67, 130, 2), seqlen=273, heads=2, groups=1, p=20, n=16,
                initial_state=True, extras=True, seed=11 + width)
    _check_conv(case, width)


def test_conv_inside_with_short_sequences_and_chunks_in_float32():
    """Packed sequences of 0-2 tokens (shorter than the conv's window), one ending with a chunk of one token (the
    window's gradient reaches back over it into the chunk before), heads of width 70, two groups; float32."""
    case = Case(batch=1, lengths=(0, 2, 65, 1, 0, 130), seqlen=198, heads=4, groups=2, p=70, n=16,
                initial_state=True, extras=True, seed=7)
    _check_conv(case)
    _check_conv(case, dtype=torch.float32, tol=TOL[torch.float32])


def test_conv_inside_is_one_call_with_gradients_only(monkeypatch):
    """With autograd: one call of the xbc ops with the conv's weight and bias (opcheck'ed) and no conv op;
    without: the conv, then SSD on its output."""
    custom, calls = cpu_kernels.XBC_FUSED.chunk_fwd, []
    monkeypatch.setattr(cpu_kernels, "XBC_FUSED", dataclasses.replace(
        cpu_kernels.XBC_FUSED, chunk_fwd=lambda *args: calls.append(args) or custom(*args)))
    conv_calls = []
    monkeypatch.setattr(mamba2_ops, "causal_conv1d", lambda *a, **k: conv_calls.append(a) or causal_conv1d(*a, **k))
    case = Case(batch=2, lengths=None, seqlen=70, heads=2, groups=1, p=4, n=6, initial_state=True, extras=True,
                seed=3)
    y, s, _ = _conv_run(case, torch.float32, 4, True, fused=True)
    assert len(calls) == 1 and not conv_calls
    xbc, weight, conv_bias = calls[0][0], calls[0][6], calls[0][7]
    assert xbc.shape == (140, 2 * 4 + 2 * 6) and weight.shape == (20, 4) and conv_bias.shape == (20,)
    torch.library.opcheck(custom.op, calls[0],
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    inputs = [t.detach() for t in _inputs(case, torch.float32)]
    with torch.no_grad():
        y2, s2 = ssd_xbc(xbc.view(2, 70, -1), *inputs[1:3], num_heads=2, n_groups=1, d_state=6, backend="cpu",
                         conv_weight=weight, conv_bias=conv_bias, **case.kwargs(inputs), output_final_state=True)
    assert len(calls) == 1 and len(conv_calls) == 1
    assert_rel(y2, y.detach(), 1e-6, "output without autograd")
    assert_rel(s2, s.detach(), 1e-6, "final state without autograd")


@settings(max_examples=6, deadline=None)
@given(case=cases(max_t=150), bias=st.booleans())
def test_norm_inside_matches_recurrence_then_rms_norm_in_float64(case, bias):
    """The output's RMSNorm (norm_weight): output, final state and every gradient, the norm's weight included,
    equal to the reference conv, the float64 recurrence and an RMSNorm over each token's H P values; gated or not
    (the case's z), in the kernels with one group and by rms_norm after them with more."""
    _check_conv(case, 4, bias, norm=True)


def test_norm_inside_in_float32_with_packed_sequences():
    case = Case(batch=1, lengths=(0, 2, 65, 1, 130), seqlen=198, heads=4, groups=1, p=70, n=16,
                initial_state=True, extras=True, seed=9)
    _check_conv(case, dtype=torch.float32, tol=TOL[torch.float32], norm=True)


@pytest.mark.parametrize("groups", [1, 2])
def test_norm_inside_the_kernels_with_one_group_only(groups, monkeypatch):
    """One group: one call of the xbc ops with the norm's weight (opcheck'ed) and no rms_norm; two: the ops without
    it, then rms_norm."""
    custom, calls, norm_calls = cpu_kernels.XBC_FUSED.chunk_fwd, [], []
    monkeypatch.setattr(cpu_kernels, "XBC_FUSED", dataclasses.replace(
        cpu_kernels.XBC_FUSED, chunk_fwd=lambda *args: calls.append(args) or custom(*args)))
    monkeypatch.setattr(mamba2_ops, "rms_norm", lambda *a, **k: norm_calls.append(a) or rms_norm(*a, **k))
    case = Case(batch=2, lengths=None, seqlen=70, heads=2, groups=groups, p=4, n=6, initial_state=True, extras=True,
                seed=5)
    _conv_run(case, torch.float32, 4, True, fused=True, norm=True)
    assert len(calls) == 1 and len(norm_calls) == (groups > 1)
    norm_weight = calls[0][8]
    assert (norm_weight is not None) == (groups == 1)
    if groups == 1:
        assert norm_weight.shape == (2 * 4,)
        torch.library.opcheck(custom.op, calls[0],
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@settings(max_examples=6, deadline=None)
@given(case=cases(max_t=150), width=st.sampled_from([1, 4]), bias=st.booleans(), norm=st.booleans())
def test_in_proj_output_whole_matches_recurrence_in_float64(case, width, bias, norm):
    """ssd_zxbcdt with the conv (and the norm) inside: output, final state and every gradient, z's and dt's
    columns of the one gradient included, equal to the reference conv and the float64 recurrence."""
    _check_conv(dataclasses.replace(case, extras=True), width, bias, norm=norm, in_proj=True)


def test_in_proj_output_whole_in_float32_with_packed_sequences():
    """Ragged packed sequences with an initial state, heads of width 70, one group (the norm inside) and two."""
    for groups in (1, 2):
        case = Case(batch=1, lengths=(0, 2, 65, 1, 130), seqlen=198, heads=4, groups=groups, p=70, n=16,
                    initial_state=True, extras=True, seed=9 + groups)
        _check_conv(case, dtype=torch.float32, tol=TOL[torch.float32], norm=True, in_proj=True)


def test_in_proj_output_whole_is_one_call_with_gradients_only(monkeypatch):
    """With autograd: one call of the xbc ops on the whole [L, 2 H P + 2 G N + H] tensor, without dt and z
    (opcheck'ed); without: the conv, then SSD on views of the blocks, with the same results."""
    custom, calls = cpu_kernels.XBC_FUSED.chunk_fwd, []
    monkeypatch.setattr(cpu_kernels, "XBC_FUSED", dataclasses.replace(
        cpu_kernels.XBC_FUSED, chunk_fwd=lambda *args: calls.append(args) or custom(*args)))
    case = Case(batch=2, lengths=None, seqlen=70, heads=2, groups=1, p=4, n=6, initial_state=True, extras=True,
                seed=3)
    y, s, _ = _conv_run(case, torch.float32, 4, True, fused=True, norm=True, in_proj=True)
    assert len(calls) == 1
    zxbcdt, dt, z = calls[0][:3]
    assert zxbcdt.shape == (140, 2 * 2 * 4 + 2 * 6 + 2) and dt is None and z is None
    torch.library.opcheck(custom.op, calls[0],
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    A, D, dt_bias, weight, conv_bias, norm_weight, h0 = (calls[0][i] for i in (3, 4, 5, 6, 7, 8, 9))
    with torch.no_grad():
        y2, s2 = ssd_zxbcdt(zxbcdt.view(2, 70, -1), A, num_heads=2, n_groups=1, d_state=6, D=D, dt_bias=dt_bias,
                            dt_softplus=case.extras, initial_state=h0, output_final_state=True, backend="cpu",
                            conv_weight=weight, conv_bias=conv_bias, norm_weight=norm_weight, norm_eps=NORM_EPS)
    assert len(calls) == 1
    assert_rel(y2, y.detach(), 1e-6, "output without autograd")
    assert_rel(s2, s.detach(), 1e-6, "final state without autograd")


def test_xbc_bad_inputs_raise_clearly():
    xbc, dt, A = torch.randn(1, 4, 20), torch.randn(1, 4, 2), -torch.rand(2)
    with pytest.raises(ValueError, match=r"xbc's last dim must be H P \+ 2 G N"):
        ssd_xbc(xbc, dt, A, num_heads=3, n_groups=1, d_state=6)
    with pytest.raises(ValueError, match=r"xbc's last dim must be H P \+ 2 G N"):
        ssd_xbc(xbc, dt, A, num_heads=2, n_groups=1, d_state=10)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        ssd_xbc(xbc, dt, A, num_heads=0, n_groups=1, d_state=6)
    with pytest.raises(ValueError, match=r"xbc must have shape \[B, T, H P \+ 2 G N\]"):
        ssd_xbc(xbc[0], dt, A, num_heads=2, n_groups=1, d_state=6)
    with pytest.raises(ValueError, match="dt"):
        ssd_xbc(xbc, dt[:, :3], A, num_heads=2, n_groups=1, d_state=6, backend="cpu")
    with pytest.raises(ValueError, match=r"conv_weight must have shape \[H P \+ 2 G N, W\]"):
        ssd_xbc(xbc, dt, A, num_heads=2, n_groups=1, d_state=6, conv_weight=torch.randn(19, 4))
    with pytest.raises(ValueError, match=r"conv_bias must have shape \[H P \+ 2 G N\]"):
        ssd_xbc(xbc, dt, A, num_heads=2, n_groups=1, d_state=6, conv_weight=torch.randn(20, 4),
                conv_bias=torch.randn(4))
    with pytest.raises(ValueError, match="conv_bias is given without conv_weight"):
        ssd_xbc(xbc, dt, A, num_heads=2, n_groups=1, d_state=6, conv_bias=torch.randn(20))
    with pytest.raises(ValueError, match=r"norm_weight must have shape \[H P\]"):
        ssd_xbc(xbc, dt, A, num_heads=2, n_groups=1, d_state=6, norm_weight=torch.randn(20))
    with pytest.raises(ValueError, match="norm_eps must be a positive finite number"):
        ssd_xbc(xbc, dt, A, num_heads=2, n_groups=1, d_state=6, norm_weight=torch.randn(8), norm_eps=-1.0)
