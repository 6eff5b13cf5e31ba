"""The C++ CPU decoding steps (seqmix/kernels/step_cpu.py): the delta rule, the gated delta rule, GLA, SSD and
the short conv, chained over a few tokens from a random state, against the float64 recurrences (one call of the
conv) and the tensor-op steps, in float32 and float64, with strong decays and strided token inputs; the layers'
steps with their projections (Mamba-2's, (Gated) DeltaNet's) against the chain of tensor-op steps; the choice
(C++ without a gradient, tensor ops with one), the fallback when the kernels cannot be built (the norms' too:
tests/archs/test_modules.py tests their C++ call), opcheck of the custom ops, and one compiled graph.

The first test to run builds the kernels (once per machine, cached by torch)."""

import pytest
import torch
import torch.nn.functional as F

from seqmix.archs import GatedDeltaNet, Mamba2
from seqmix.archs.modules import RMSNorm
from seqmix.kernels import causal_conv1d, step_cpu
from seqmix.kernels import cpu as cpu_build
from seqmix.kernels.backend import recording
from seqmix.kernels.conv.step import causal_conv1d_step
from seqmix.kernels.deltanet import delta_rule_recurrent, gated_delta_rule_recurrent
from seqmix.kernels.deltanet.step import delta_rule_step, gated_delta_rule_step
from seqmix.kernels.gated_linear_attention.reference import gla_recurrent
from seqmix.kernels.gated_linear_attention.step import gla_step
from seqmix.kernels.mamba2.reference import ssd_recurrent
from seqmix.kernels.mamba2.step import ssd_step
from tests.helpers import TOL, assert_rel, require_cpu_kernels, torch_threads

B, T, H, K, V, G, N = 2, 5, 4, 16, 19, 2, 11
SCALE = 0.6
SSD_OPTIONS = {"dt_softplus": True, "dt_limit": (0.0, 6.0)}
RULES = ("delta_rule", "gated_delta_rule", "gla", "ssd")
OP_OF = {"delta_rule": "delta_rule_step", "gated_delta_rule": "delta_rule_step", "gla": "gla_step",
         "ssd": "ssd_step"}


@pytest.fixture
def kernels_built(monkeypatch):
    """Skips where the kernels cannot be built here (no compiler or ninja); the automatic choice on."""
    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")


built = pytest.mark.usefixtures("kernels_built")


def _strided(gen, *shape):
    """[B, T, H, X] float64 values as a view that is strided over the heads (every other head of a wider
    tensor), the way token inputs arrive as rows of a projection."""
    b, t, h, x = shape
    return torch.randn(b, t, 2 * h, x, generator=gen, dtype=torch.float64)[:, :, ::2]


def _inputs(rule):
    """Per-token inputs [B, T, ...] and the initial state, float64; decays down to e^-8 per token."""
    gen = torch.Generator().manual_seed(RULES.index(rule))
    if rule == "ssd":
        A = -torch.rand(H, generator=gen, dtype=torch.float64) * 3 - 0.1
        x, z = _strided(gen, B, T, H, V), _strided(gen, B, T, H, V)
        dt = torch.randn(B, T, H, generator=gen, dtype=torch.float64) * 2
        Bm, Cm = (torch.randn(B, T, G, N, generator=gen, dtype=torch.float64) for _ in range(2))
        D, bias = (torch.randn(H, generator=gen, dtype=torch.float64) for _ in range(2))
        return [x, dt, A, Bm, Cm, D, z, bias], torch.randn(B, H, V, N, generator=gen, dtype=torch.float64)
    q = F.normalize(_strided(gen, B, T, H, K), dim=-1)
    # k with a strided last dimension (the kernels make such rows contiguous).
    k = F.normalize(torch.randn(B, T, K, H, generator=gen, dtype=torch.float64).transpose(-1, -2), dim=-1)
    v = _strided(gen, B, T, H, V)
    state = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    if rule == "gla":
        g = -8 * torch.rand(B, T, H, K, generator=gen, dtype=torch.float64)
        return [q, k, v, g], state
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    if rule == "delta_rule":
        return [q, k, v, beta], state
    return [q, k, v, -8 * torch.rand(B, T, H, generator=gen, dtype=torch.float64), beta], state


def _chain(rule, inputs, state):
    """The public step over T tokens: (outputs [B, T, ...], final state)."""
    outs = []
    for t in range(T):
        if rule == "ssd":
            x, dt, A, Bm, Cm, D, z, bias = inputs
            o, state = ssd_step(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], state, D=D, z=z[:, t], dt_bias=bias,
                                **SSD_OPTIONS)
        else:
            step = {"delta_rule": delta_rule_step, "gated_delta_rule": gated_delta_rule_step, "gla": gla_step}[rule]
            o, state = step(*(x[:, t] for x in inputs), state, scale=SCALE)
        outs.append(o)
    return torch.stack(outs, 1), state


def _oracle(rule, inputs, state):
    if rule == "ssd":
        return ssd_recurrent(*inputs, **SSD_OPTIONS, initial_state=state, output_final_state=True)
    oracle = {"delta_rule": delta_rule_recurrent, "gated_delta_rule": gated_delta_rule_recurrent,
              "gla": gla_recurrent}[rule]
    return oracle(*inputs, SCALE, initial_state=state, output_final_state=True)


@built
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rule", RULES)
def test_cpu_step_equals_oracle_and_tensor_op_step(rule, dtype, monkeypatch):
    inputs, state = _inputs(rule)
    cast = [t.to(dtype) for t in inputs]
    with torch.no_grad(), recording() as choices:
        out, final = _chain(rule, cast, state.to(dtype))
    assert {(c.op, c.backend) for c in choices} == {(OP_OF[rule], "cpu")}
    assert out.dtype == dtype and final.dtype == dtype and final.is_contiguous()
    out_ref, final_ref = _oracle(rule, inputs, state)
    tol = 1e-12 if dtype == torch.float64 else TOL[dtype] / 10
    assert_rel(out, out_ref, tol, "output against the float64 recurrence")
    assert_rel(final, final_ref, tol, "final state against the float64 recurrence")
    monkeypatch.setenv("SEQMIX_BACKEND", "reference")
    with torch.no_grad():
        out_ops, final_ops = _chain(rule, cast, state.to(dtype))
    assert_rel(out, out_ops, tol, "output against the tensor-op step")
    assert_rel(final, final_ops, tol, "final state against the tensor-op step")


@built
@pytest.mark.parametrize("rule", RULES)
def test_state_passed_in_stays_valid_and_low_precision_inputs_compute_in_float32(rule):
    inputs, state = _inputs(rule)
    per_token = [t.to(torch.bfloat16) if t.dim() > 1 else t for t in inputs]
    before = state.float().clone()
    s = before.clone()
    with torch.no_grad():
        out, final = _chain(rule, per_token, s)
    assert torch.equal(s, before)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    out_ref, final_ref = _oracle(rule, [t.double() for t in per_token], state)
    assert_rel(out, out_ref, TOL[torch.bfloat16], "bfloat16 output")
    assert_rel(final, final_ref, TOL[torch.float32], "final state from bfloat16 inputs")


@built
@pytest.mark.parametrize("rule", RULES)
def test_a_wanted_gradient_takes_the_tensor_ops(rule):
    inputs, state = _inputs(rule)
    state.requires_grad_()
    with recording() as choices:
        out, final = _chain(rule, inputs, state)
    assert {c.backend for c in choices} == {"reference"}
    assert "a gradient is wanted" in choices[0].reason
    (grad,) = torch.autograd.grad(out.sum() + final.sum(), state)
    assert grad.shape == state.shape


@pytest.fixture
def failed_build(monkeypatch):
    """The C++ kernels as after a failed build (no compiler), the automatic choice on."""
    monkeypatch.setattr(cpu_build, "_tried", True)
    monkeypatch.setattr(cpu_build, "_reason", "the C++ CPU kernels could not be built: no compiler")
    monkeypatch.setattr(cpu_build, "_module", None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)


@pytest.mark.usefixtures("failed_build")
def test_a_failed_build_falls_back_to_the_tensor_ops():
    for rule in RULES:
        inputs, state = _inputs(rule)
        with torch.no_grad(), recording() as choices:
            out, final = _chain(rule, [t.float() for t in inputs], state.float())
        assert {c.backend for c in choices} == {"reference"}
        assert "cpu: the C++ CPU kernels could not be built: no compiler" in choices[0].reason
        out_ref, final_ref = _oracle(rule, inputs, state)
        assert_rel(out, out_ref, TOL[torch.float32], f"{rule}: output of the fallback")
        assert_rel(final, final_ref, TOL[torch.float32], f"{rule}: final state of the fallback")
    x = torch.randn(3, 8)
    with torch.no_grad(), recording() as choices:
        y = RMSNorm(8)(x, x)
    assert not choices  # the norms take the C++ call only once built, and not as a recorded choice
    assert_rel(y, x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5) * F.silu(x), 1e-6, "norm's fallback")


def _op_calls(rule):
    """(custom op, one call's arguments) for the first token in float32."""
    inputs, state = _inputs(rule)
    first = [t[:, 0].float() if t.dim() > 1 else t.float() for t in inputs]
    state = state.float()
    if rule == "ssd":
        x, dt, A, Bm, Cm, D, z, bias = first
        return step_cpu._ssd_op, (x, dt, A, Bm, Cm, state, D, z, bias, True, 0.0, float("inf"))
    if rule == "gla":
        return step_cpu._gla_op, (*first, state, SCALE)
    q, k, v, *g, beta = first
    return step_cpu._delta_rule_op, (q, k, v, beta, g[0] if g else None, state, SCALE)


@built
@pytest.mark.parametrize("rule", RULES)
def test_custom_ops_pass_opcheck(rule):
    op, args = _op_calls(rule)
    torch.library.opcheck(op.op, args, test_utils=("test_schema", "test_faketensor"))


@built
def test_compiled_steps_trace_into_one_graph_and_equal_eager():
    """fullgraph=True: the custom ops trace (Dynamo's eager backend: no inductor compile in the tests)."""
    for rule in RULES:
        inputs, state = _inputs(rule)
        cast = [t.float() for t in inputs]
        with torch.no_grad():
            compiled = torch.compile(lambda xs, s, rule=rule: _chain(rule, xs, s), fullgraph=True, backend="eager")
            out, final = compiled(cast, state.float())
            out_eager, final_eager = _chain(rule, cast, state.float())
        torch.testing.assert_close(out, out_eager, rtol=0, atol=0)
        torch.testing.assert_close(final, final_eager, rtol=0, atol=0)


def _conv_inputs(W, dtype):
    g = torch.Generator().manual_seed(W)
    x = torch.randn(2, 6, 2 * 7, generator=g, dtype=torch.float64)[..., ::2]  # [2, 6, 7] strided channels
    return (x.to(dtype), torch.randn(7, W, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(7, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(2, 7, W - 1, generator=g, dtype=torch.float64).to(dtype))


def _conv_chain(x, w, b, activation, state):
    outs = []
    for t in range(x.shape[1]):
        o, state = causal_conv1d_step(x[:, t], w, b, activation, state)
        outs.append(o)
    return torch.stack(outs, 1), state


@built
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("W, with_bias, activation", [(4, True, "silu"), (4, False, None), (1, True, "silu")])
def test_cpu_conv_step_equals_one_call_and_tensor_op_step(W, with_bias, activation, dtype, monkeypatch):
    x, w, b, h0 = _conv_inputs(W, dtype)
    b = b if with_bias else None
    with torch.no_grad(), recording() as choices:
        out, state = _conv_chain(x, w, b, activation, h0)
    assert {(c.op, c.backend) for c in choices} == {("causal_conv1d_step", "cpu")}
    assert out.dtype == dtype and state.dtype == dtype and state.shape == h0.shape
    full, final = causal_conv1d(*(None if t is None else t.double() for t in (x, w, b)), activation=activation,
                                initial_state=h0.double(), output_final_state=True, backend="reference")
    tol = 1e-12 if dtype == torch.float64 else TOL[dtype] / 10
    assert_rel(out, full, tol, "output against one call in float64")
    if W > 1:
        assert_rel(state, final, tol, "state against one call in float64")
    monkeypatch.setenv("SEQMIX_BACKEND", "reference")
    with torch.no_grad():
        out_ops, state_ops = _conv_chain(x, w, b, activation, h0)
    assert_rel(out, out_ops, tol, "output against the tensor-op step")
    if W > 1:
        assert_rel(state, state_ops, tol, "state against the tensor-op step")
    x, w, b, h0 = (t.float() for t in _conv_inputs(W, dtype))
    torch.library.opcheck(step_cpu._conv_step_op.op, (x[:, 0], w, b if with_bias else None, activation == "silu", h0),
                          test_utils=("test_schema", "test_faketensor"))


@built
def test_unwatched_choice_takes_the_same_paths(monkeypatch):
    """Without a watcher (recording, explain, DEBUG logging) `serves` skips select_backend: the same choice."""
    calls = []
    real = step_cpu.gla_step
    monkeypatch.setattr(step_cpu, "gla_step", lambda *args: calls.append(1) or real(*args))
    inputs, state = _inputs("gla")
    with torch.no_grad():
        _chain("gla", inputs, state)
    assert len(calls) == T
    monkeypatch.setenv("SEQMIX_BACKEND", "reference")
    with torch.no_grad():
        _chain("gla", inputs, state)
    monkeypatch.delenv("SEQMIX_BACKEND")
    _chain("gla", inputs, state.requires_grad_())
    assert len(calls) == T


# The layers' fused steps with their projections (step_cpu.mamba2_step, step_cpu.deltanet_step) against the
# chain of F.linear and tensor-op steps they replace, over a few tokens from random states: heads in groups,
# widths that are not whole vectors, token rows that are strided views.
M2_H, M2_P, M2_G, M2_N = 4, 5, 2, 11
DN_H, DN_K, DN_V = 3, 6, 7
HIDDEN = 13


def _rows(gen, width):
    """[B, T, width] float64 rows that are views of wider rows."""
    return torch.randn(B, T, width + 5, generator=gen, dtype=torch.float64)[..., 3 : 3 + width]


def _projections(gen, features, inner):
    """A layer's input projection's weight [features, HIDDEN] and output projection's [HIDDEN, inner], float64."""
    return (torch.randn(features, HIDDEN, generator=gen, dtype=torch.float64) / HIDDEN**0.5,
            torch.randn(HIDDEN, inner, generator=gen, dtype=torch.float64) / inner**0.5)


def _rms(y, weight, eps, gate=None):
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps) * weight
    return y if gate is None else y * F.silu(gate)


def _mamba2_inputs(W):
    gen = torch.Generator().manual_seed(40 + W)
    inner, C = M2_H * M2_P, M2_H * M2_P + 2 * M2_G * M2_N
    x = _rows(gen, HIDDEN) * 2
    proj = _projections(gen, inner + C + M2_H, inner)
    conv = [torch.randn(C, W, generator=gen, dtype=torch.float64), torch.randn(C, generator=gen, dtype=torch.float64),
            torch.randn(B, C, W - 1, generator=gen, dtype=torch.float64)]
    A = -torch.rand(M2_H, generator=gen, dtype=torch.float64) * 3 - 0.1
    D, dt_bias = (torch.randn(M2_H, generator=gen, dtype=torch.float64) for _ in range(2))
    ssm = torch.randn(B, M2_H, M2_P, M2_N, generator=gen, dtype=torch.float64)
    return x, proj, conv, A, D, dt_bias, ssm, 1 + torch.randn(inner, generator=gen, dtype=torch.float64) / 4


def _mamba2_chain(fused, x, proj, conv, A, D, dt_bias, ssm, norm_weight, dt_limit, eps=1e-5):
    """step_cpu.mamba2_step over the tokens of x, or (fused=False) the F.linear and tensor-op steps it replaces."""
    (in_weight, out_weight), (w, bias, conv_state) = proj, conv
    inner, C = M2_H * M2_P, w.shape[0]
    ys = []
    for t in range(T):
        if fused:
            y, conv_state, ssm = step_cpu.mamba2_step(x[:, t], in_weight, w, bias, conv_state, A, D, dt_bias, True,
                                                      *dt_limit, ssm, norm_weight, eps, out_weight)
        else:
            z, xbc, dt = F.linear(x[:, t], in_weight).split([inner, C, M2_H], -1)
            xbc, conv_state = causal_conv1d_step(xbc, w, bias, "silu", conv_state)
            xs, b, c = xbc.split([inner, M2_G * M2_N, M2_G * M2_N], -1)
            y, ssm = ssd_step(xs.reshape(B, M2_H, M2_P), dt, A, b.reshape(B, M2_G, M2_N), c.reshape(B, M2_G, M2_N),
                              ssm, D=D, z=z.reshape(B, M2_H, M2_P), dt_bias=dt_bias, dt_softplus=True,
                              dt_limit=dt_limit)
            y = F.linear(_rms(y.reshape(B, inner), norm_weight, eps), out_weight)
        ys.append(y)
    return torch.stack(ys, 1), conv_state, ssm


@built
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("W, dt_limit", [(4, (0.0, float("inf"))), (1, (0.05, 2.0))])
def test_cpu_mamba2_layer_step_equals_the_tensor_op_steps(W, dt_limit, dtype, monkeypatch):
    x, proj, conv, A, D, dt_bias, ssm, norm_weight = _mamba2_inputs(W)
    cast = lambda t: t.to(dtype)
    with torch.no_grad():
        y, conv_state, state = _mamba2_chain(True, cast(x), [cast(t) for t in proj], [cast(t) for t in conv],
                                             *map(cast, (A, D, dt_bias, ssm, norm_weight)), dt_limit)
        monkeypatch.setenv("SEQMIX_BACKEND", "reference")
        want = _mamba2_chain(False, x, proj, conv, A, D, dt_bias, ssm, norm_weight, dt_limit)
    assert y.dtype == dtype and conv_state.dtype == dtype and state.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else TOL[dtype] / 10
    for got, ref, what in zip((y, conv_state, state), want, ("output", "conv state", "SSD state")):
        assert_rel(got, ref, tol, f"{what} against the float64 tensor-op steps")


def _deltanet_inputs(gated, conv, gate):
    gen = torch.Generator().manual_seed(50 + 4 * gated + 2 * conv + gate)
    C = 2 * DN_H * DN_K + DN_H * DN_V
    x = _rows(gen, HIDDEN) * 2
    in_weight, out_weight = _projections(gen, C + DN_H * DN_V * gate + DN_H * (1 + gated), DN_H * DN_V)
    in_weight[-DN_H:] *= 12  # decays' inputs past softplus's threshold (20) too
    taps = [torch.randn(C, 4, generator=gen, dtype=torch.float64),
            torch.randn(B, C, 3, generator=gen, dtype=torch.float64)] if conv else [None, None]
    decay = [torch.randn(DN_H, generator=gen, dtype=torch.float64) for _ in range(2)] if gated else [None, None]
    state = torch.randn(B, DN_H, DN_K, DN_V, generator=gen, dtype=torch.float64)
    norm_weight = 1 + torch.randn(DN_V, generator=gen, dtype=torch.float64) / 4
    return x, [in_weight, out_weight], taps, decay, state, norm_weight


def _deltanet_chain(fused, x, proj, taps, decay, state, norm_weight, gate, eps=1e-5, l2_eps=1e-6):
    """step_cpu.deltanet_step over the tokens of x, or (fused=False) the F.linear and tensor-op steps it replaces."""
    (in_weight, out_weight), (w, conv_state), (A_log, dt_bias) = proj, taps, decay
    H, K, V = DN_H, DN_K, DN_V
    scale = K**-0.5
    outs = []
    for t in range(T):
        if fused:
            o, conv, state = step_cpu.deltanet_step(x[:, t], in_weight, w, conv_state, state, A_log, dt_bias,
                                                    norm_weight, eps, gate, scale, l2_eps, out_weight)
            conv_state = None if w is None else conv  # without the convs the op returns an empty window
        else:
            sizes = [2 * H * K + H * V] + [H * V] * gate + [H] * (1 + (A_log is not None))
            qkv, *rest = F.linear(x[:, t], in_weight).split(sizes, -1)
            if w is None:
                qkv = F.silu(qkv)
            else:
                qkv, conv_state = causal_conv1d_step(qkv, w, None, "silu", conv_state)
            qk = qkv[:, : 2 * H * K].reshape(B, 2 * H, K)
            q, k = (qk * torch.rsqrt(qk.square().sum(-1, keepdim=True) + l2_eps)).split(H, 1)
            v = qkv[:, 2 * H * K :].reshape(B, H, V)
            beta = torch.sigmoid(rest[gate])
            if A_log is None:
                o, state = delta_rule_step(q, k, v, beta, state, scale=scale)
            else:
                g = -A_log.exp() * F.softplus(rest[gate + 1] + dt_bias)
                o, state = gated_delta_rule_step(q, k, v, g, beta, state, scale=scale)
            o = F.linear(_rms(o, norm_weight, eps, rest[0].reshape(B, H, V) if gate else None).reshape(B, H * V),
                         out_weight)
        outs.append(o)
    return torch.stack(outs, 1), conv_state, state


@built
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gated, conv, gate", [(True, True, True), (False, True, True), (True, False, False)])
def test_cpu_deltanet_layer_step_equals_the_tensor_op_steps(gated, conv, gate, dtype, monkeypatch):
    x, proj, taps, decay, state, norm_weight = _deltanet_inputs(gated, conv, gate)
    cast = lambda t: None if t is None else t.to(dtype)
    with torch.no_grad():
        o, conv_state, final = _deltanet_chain(True, cast(x), [cast(t) for t in proj], [cast(t) for t in taps],
                                               [cast(t) for t in decay], cast(state), cast(norm_weight), gate)
        monkeypatch.setenv("SEQMIX_BACKEND", "reference")
        want_o, want_conv, want_final = _deltanet_chain(False, x, proj, taps, decay, state, norm_weight, gate)
    assert o.dtype == dtype and final.dtype == dtype and (conv_state is None) == (not conv)
    tol = 1e-12 if dtype == torch.float64 else TOL[dtype] / 10
    assert_rel(o, want_o, tol, "output against the float64 tensor-op steps")
    assert_rel(final, want_final, tol, "state against the float64 tensor-op steps")
    if conv:
        assert_rel(conv_state, want_conv, tol, "conv state against the float64 tensor-op steps")


def _float(inputs):
    """The layer inputs in float32 (lists of tensors, with Nones, too)."""
    return [t.float() if isinstance(t, torch.Tensor) else [None if u is None else u.float() for u in t]
            for t in inputs]


def _layer_op_calls():
    """(custom op, one float32 call's arguments) of the two layer steps."""
    x, (in_weight, out_weight), (w, bias, conv_state), A, D, dt_bias, ssm, norm_weight = _float(_mamba2_inputs(4))
    mamba2 = (x[:, 0].contiguous(), in_weight, w, bias, conv_state, A, D, dt_bias, True, 0.0, float("inf"), ssm,
              norm_weight, 1e-5, out_weight)
    calls = [(step_cpu.mamba2_step, mamba2)]
    for gated, conv, gate in ((True, True, True), (False, False, False)):
        x, (in_weight, out_weight), (w, conv_state), (A_log, dt_bias), state, norm_weight = _float(
            _deltanet_inputs(gated, conv, gate))
        calls.append((step_cpu.deltanet_step, (x[:, 0].contiguous(), in_weight, w, conv_state, state, A_log, dt_bias,
                                              norm_weight, 1e-5, gate, 0.4, 1e-6, out_weight)))
    return calls


@built
def test_layer_step_custom_ops_pass_opcheck_and_trace_into_one_graph():
    """opcheck of the layer steps' custom ops, and fullgraph=True over two chained tokens (Dynamo's eager
    backend) equal to eager."""
    for op, args in _layer_op_calls():
        torch.library.opcheck(op.op, args, test_utils=("test_schema", "test_faketensor"))
    x, proj, conv, A, D, dt_bias, ssm, norm_weight = _float(_mamba2_inputs(4))
    with torch.no_grad():
        run = lambda x, ssm: _mamba2_chain(True, x, proj, conv, A, D, dt_bias, ssm, norm_weight, (0.0, float("inf")))
        for got, want in zip(torch.compile(run, fullgraph=True, backend="eager")(x, ssm), run(x, ssm)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        x, proj, taps, decay, state, norm_weight = _float(_deltanet_inputs(True, True, True))
        run = lambda x, state: _deltanet_chain(True, x, proj, taps, decay, state, norm_weight, True)
        for got, want in zip(torch.compile(run, fullgraph=True, backend="eager")(x, state), run(x, state)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.usefixtures("failed_build")
def test_a_failed_build_leaves_the_layers_decoding_on_the_tensor_op_steps():
    """Without the C++ kernels the layers' decoding steps take the tensor ops (said as the choice's reason) and
    still equal the training call."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
    layers = {"mamba2_step": Mamba2(hidden_size=32, head_dim=16, d_state=8, n_groups=2),
              "deltanet_step": GatedDeltaNet(hidden_size=32, num_heads=2)}
    for op, layer in layers.items():
        with torch.no_grad(), recording() as choices:
            full, _ = layer(x)
            steps, state = [], layer(x[:, :3], layer.init_state(2))[1]
            for t in range(3, 7):
                y, state = layer(x[:, t : t + 1], state)
                steps.append(y)
        chosen = [c for c in choices if c.op == op]
        assert chosen and {c.backend for c in chosen} == {"reference"}
        assert "cpu: the C++ CPU kernels could not be built: no compiler" in chosen[0].reason
        assert_rel(torch.cat(steps, 1), full[:, 3:], TOL[torch.float32], f"{op}: decoding on the tensor ops")


# Rows up to 8 take the products of a few rows (rows_cpu.h, matrix_times_row), 9 ATen's; widths that are not a
# multiple of a vector (40 features, 2 x 70 gate and up outputs).
@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_residual_swiglu_step_equals_the_tensor_ops(rows, dtype):
    require_cpu_kernels()
    D, I = 40, 70
    g = torch.Generator().manual_seed(rows)
    x, y = (torch.randn(rows, 1, D, generator=g, dtype=torch.float64) for _ in range(2))
    norm_weight = 1 + torch.rand(D, generator=g, dtype=torch.float64)
    gate_up = torch.randn(2 * I, D, generator=g, dtype=torch.float64) / D**0.5
    down = torch.randn(D, I, generator=g, dtype=torch.float64) / I**0.5
    h = x + y
    gate, up = F.linear(h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-5) * norm_weight, gate_up).chunk(2, -1)
    want = h + F.linear(F.silu(gate) * up, down)
    got = step_cpu.residual_swiglu_step(*(t.to(dtype) for t in (x, y, norm_weight)), 1e-5, gate_up.to(dtype),
                                        down.to(dtype))
    assert got.dtype == dtype
    assert_rel(got, want, 1e-13 if dtype == torch.float64 else TOL[torch.float32], "residual + SwiGLU step")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("step", ["residual_swiglu_step", "sandwich_swiglu_step"])
def test_mlp_steps_give_each_of_a_few_rows_its_result_alone(step, dtype):
    """The few-rows products read a weight once for up to eight rows (rows_cpu.h, matrix_times_rows): each row's
    result equals its result as a batch of one bit for bit, at every batch size up to eight, with sizes that leave
    partial vectors and rows past the last full block of the weights."""
    require_cpu_kernels()
    D, I = 40, 70
    g = torch.Generator().manual_seed(1)
    norms = [1 + torch.rand(D, generator=g, dtype=dtype) for _ in range(3 if step == "sandwich_swiglu_step" else 1)]
    mlp = (torch.randn(2 * I, D, generator=g, dtype=dtype), torch.randn(D, I, generator=g, dtype=dtype))
    op = getattr(step_cpu, step)
    for B in range(1, 9):
        x, y = (torch.randn(B, D, generator=g, dtype=dtype) for _ in range(2))
        together = op(x, y, *norms, 1e-5, *mlp)
        alone = torch.cat([op(x[b : b + 1], y[b : b + 1], *norms, 1e-5, *mlp) for b in range(B)])
        assert torch.equal(together, alone), f"{B} rows"


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weight_products_split_among_threads_give_the_same_bits(rows, dtype):
    """A weight of at least two tasks' shares (2 x 2^14 values) has its rows split among the threads (linear_cpu.h,
    weight_times_rows): the result is the same bit for bit with one thread and with three (an uneven split, a last
    task with the rows past the last full vector), and right against float64. Sizes: gate_up [340, 200] and down
    [200, 170], both above the threshold, neither a multiple of a vector."""
    require_cpu_kernels()
    D, I = 200, 170
    g = torch.Generator().manual_seed(rows)
    x, y = (torch.randn(rows, D, generator=g, dtype=torch.float64) for _ in range(2))
    norm_weight = 1 + torch.rand(D, generator=g, dtype=torch.float64)
    gate_up = torch.randn(2 * I, D, generator=g, dtype=torch.float64) / D**0.5
    down = torch.randn(D, I, generator=g, dtype=torch.float64) / I**0.5
    assert min(gate_up.numel(), down.numel()) >= 2 * 2**14
    h = x + y
    gate, up = F.linear(h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-5) * norm_weight, gate_up).chunk(2, -1)
    want = h + F.linear(F.silu(gate) * up, down)
    args = [t.to(dtype) for t in (x, y, norm_weight)] + [1e-5] + [t.to(dtype) for t in (gate_up, down)]
    with torch_threads(1):
        one = step_cpu.residual_swiglu_step(*args)
    with torch_threads(3):
        three = step_cpu.residual_swiglu_step(*args)
    assert torch.equal(one, three)
    assert_rel(three, want, 1e-13 if dtype == torch.float64 else TOL[torch.float32], "residual + SwiGLU step")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("step", ["residual_swiglu_step", "sandwich_swiglu_step"])
def test_mlp_steps_few_rows_equal_their_tensor_path(step, dtype):
    """At a decoding step's few contiguous rows the MLP steps keep their intermediates in a scratch buffer
    (mlp_step_cpu.cpp, residual_swiglu_rows and sandwich_swiglu_rows); a non-contiguous y takes the tensor path,
    the same values."""
    require_cpu_kernels()
    D, I = 40, 70
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, D, generator=g, dtype=dtype)
    y = torch.randn(3, 1, 2 * D, generator=g, dtype=dtype)[..., ::2]
    norms = [1 + torch.rand(D, generator=g, dtype=dtype) for _ in range(3 if step == "sandwich_swiglu_step" else 1)]
    mlp = (torch.randn(2 * I, D, generator=g, dtype=dtype), torch.randn(D, I, generator=g, dtype=dtype))
    assert not y.is_contiguous()
    op = getattr(step_cpu, step)
    fast = op(x, y.contiguous(), *norms, 1e-5, *mlp)
    assert torch.equal(fast, op(x, y, *norms, 1e-5, *mlp))
