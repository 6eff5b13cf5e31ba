"""The op layer (seqmix/kernels/op.py): every fused op is a torch.library custom op whose schema, fake
(shape-only) implementation and registered autograd agree with what its kernels do, and the public
ops trace into one graph under torch.compile(fullgraph=True)."""

import dataclasses
import importlib

import pytest
import torch

from seqmix import kernels as ops
from tests.helpers import DEVICE, assert_rel

# torch.library.opcheck's own eager-vs-traced comparison (test_aot_dispatch_*) compares every output
# element, also the unwritten rows of scratch outputs kept for the backward; the compiled calls below
# compare what the ops return instead.
OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")
# The decompositions and partitioner of inductor, run eagerly: what the CPU can check of a compiled graph.
COMPILER = "aot_eager_decomp_partition"


def _randn(*shape, scale=1.0):
    return (scale * torch.randn(*shape, device=DEVICE)).requires_grad_()


def _delta_rule_args(gated: bool, B=2, T=20, H=2, K=16, V=16):
    q, k, v = _randn(B, T, H, K), _randn(B, T, H, K, scale=0.3), _randn(B, T, H, V)
    beta = torch.rand(B, T, H, device=DEVICE).requires_grad_()
    args = (q, k, v, -torch.rand(B, T, H, device=DEVICE).requires_grad_(), beta) if gated else (q, k, v, beta)
    return args, {"initial_state": _randn(B, H, K, V)}


def _gla_args(B=2, T=20, H=2, K=16, V=16):
    g = (-torch.rand(B, T, H, K, device=DEVICE)).requires_grad_()
    return (_randn(B, T, H, K), _randn(B, T, H, K), _randn(B, T, H, V), g), {"initial_state": _randn(B, H, K, V)}


def _ssd_args(B=2, T=20, H=2, P=16, G=1, N=16):
    A = -torch.rand(H, device=DEVICE).add(0.5).requires_grad_()
    return (_randn(B, T, H, P), _randn(B, T, H), A, _randn(B, T, G, N), _randn(B, T, G, N)), {
        "D": _randn(H), "z": _randn(B, T, H, P), "dt_bias": _randn(H), "dt_softplus": True,
        "initial_state": _randn(B, H, P, N)}


def _scan_args(B=2, T=20, D=16, N=8):
    A = -torch.rand(D, N, device=DEVICE).add(0.5).requires_grad_()
    return (_randn(B, T, D), _randn(B, T, D), A, _randn(B, T, N), _randn(B, T, N)), {
        "D": _randn(D), "z": _randn(B, T, D), "delta_bias": _randn(D), "delta_softplus": True,
        "initial_state": _randn(B, D, N)}


def _conv_args(B=2, T=20, D=16, W=4):
    return (_randn(B, T, D), _randn(D, W), _randn(D)), {"activation": "silu", "initial_state": _randn(B, D, W - 1)}


def _dynamic_conv_args(B=2, T=20, H=2, R=4, K=3):
    return (_randn(B, T, H * R), _randn(B, T, H, K)), {"dropconnect": 0.25, "seed": 3}


def _boundaries(B=2, T=20):
    return (torch.rand(B, T, device=DEVICE) < 0.3).float().requires_grad_()


def _pool_args(B=2, T=20, D=16):
    return (_randn(B, T, D), _boundaries(B, T)), {"max_segments": 5}


def _upsample_args(B=2, T=20, D=16, S=5):
    return (_randn(B, S + 1, D), _boundaries(B, T)), {}


def _norm_args(B=2, T=20, D=16):
    return (_randn(B, T, D), _randn(B, T, D), _randn(D)), {}


# public op, the module holding its FUSED custom ops (None: tested apart, below), inputs
CASES = {
    "delta_rule": (ops.delta_rule, "deltanet", lambda: _delta_rule_args(False)),
    "gated_delta_rule": (ops.gated_delta_rule, "deltanet", lambda: _delta_rule_args(True)),
    "gla": (ops.gla, "gated_linear_attention", _gla_args),
    "ssd": (ops.ssd, "mamba2", _ssd_args),
    "selective_scan": (ops.selective_scan, "mamba", _scan_args),
    "causal_conv1d": (ops.causal_conv1d, "conv", _conv_args),
    "dynamic_conv": (ops.dynamic_conv, None, _dynamic_conv_args),
    "segment_pool": (ops.segment_pool, None, _pool_args),
    "segment_upsample": (ops.segment_upsample, None, _upsample_args),
    "add_rms_norm": (ops.add_rms_norm, None, _norm_args),
}


def _tensors(args, kwargs):
    return [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]


def _outputs(result):
    return [t for t in (result if isinstance(result, tuple) else (result,)) if t is not None]


@pytest.mark.slow
@pytest.mark.parametrize("name, path", [(name, "chunk_fwd") for name in ("delta_rule", "gated_delta_rule", "gla", "ssd",
                                                                          "selective_scan", "causal_conv1d")]
                         + [(name, "recurrent_fwd") for name in ("gated_delta_rule", "gla", "ssd", "selective_scan")])
def test_custom_ops_pass_opcheck(name, path, monkeypatch):
    """Schema, fake implementation (shapes, dtypes, strides) and autograd registration of each op's
    custom ops, on the arguments the public op hands them."""
    op, module_name, make = CASES[name]
    module = importlib.import_module(f"seqmix.kernels.{module_name}")
    fused = module.FUSED
    custom = getattr(fused, path)
    calls = []

    def spy(*args):
        calls.append(args)
        return custom(*args)

    monkeypatch.setattr(module, "FUSED", dataclasses.replace(fused, **{path: spy}))
    args, kwargs = make()
    with torch.set_grad_enabled(path == "chunk_fwd"):  # the token-by-token kernel serves no-grad calls
        op(*args, **kwargs, output_final_state="initial_state" in kwargs, backend="triton")
    assert len(calls) == 1, f"{name}: the {path} op was not called"
    args = calls[0] if path == "chunk_fwd" else [a.detach() if isinstance(a, torch.Tensor) else a for a in calls[0]]
    torch.library.opcheck(custom.op, args, test_utils=OPCHECKS)


def test_dynamic_conv_op_passes_opcheck(monkeypatch):
    from seqmix.kernels.conv import dynamic

    calls = []
    custom = dynamic._chunk_fwd
    monkeypatch.setattr(dynamic, "_chunk_fwd", lambda *args: calls.append(args) or custom(*args))
    args, kwargs = _dynamic_conv_args()
    ops.dynamic_conv(*args, **kwargs, backend="triton")
    torch.library.opcheck(custom.op, calls[0], test_utils=OPCHECKS)


@pytest.mark.parametrize("name, module_name, custom_name", [
    ("segment_pool", "pooling", "_pool_fwd"), ("segment_upsample", "pooling", "_upsample_fwd"),
    ("add_rms_norm", "norm", "_fwd"),
])
def test_stateless_ops_pass_opcheck(name, module_name, custom_name, monkeypatch):
    """The segment ops' and add_rms_norm's custom ops (no FusedOp: they have no state to run_fused)."""
    op, _, make = CASES[name]
    module = importlib.import_module(f"seqmix.kernels.{module_name}")
    custom = getattr(module, custom_name)
    calls = []
    monkeypatch.setattr(module, custom_name, lambda *args: calls.append(args) or custom(*args))
    args, kwargs = make()
    op(*args, **kwargs, backend="triton")
    assert len(calls) == 1, f"{name}: the {custom_name} op was not called"
    torch.library.opcheck(custom.op, calls[0], test_utils=OPCHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_public_ops_compile_without_graph_breaks(name):
    """torch.compile(fullgraph=True) traces the whole op (checks, packing, custom ops, autograd):
    outputs and input gradients equal the eager call's."""
    op, _, make = CASES[name]
    args, kwargs = make()
    if "initial_state" in kwargs:
        kwargs["output_final_state"] = True

    def call(*a):
        return _outputs(op(*a, **kwargs, backend="triton"))

    inputs = _tensors(args, kwargs)
    eager = call(*args)
    weights = [torch.randn_like(t) for t in eager]
    grads = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, eager)), inputs)
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend=COMPILER)(*args)
    compiled_grads = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, compiled)), inputs)
    for i, (a, b) in enumerate(zip(compiled, eager)):
        assert_rel(a, b, 1e-6, f"{name} output {i}")
    for i, (a, b) in enumerate(zip(compiled_grads, grads)):
        assert_rel(a, b, 1e-6, f"{name} gradient {i}")


def test_decoding_step_compiles():
    """A decoding step (no gradient, one token per sequence: the token-by-token kernel) compiled."""
    (q, k, v, g), kwargs = _gla_args(T=1)

    def step(q, k, v, g, h):
        return ops.gla(q, k, v, g, initial_state=h, output_final_state=True, backend="triton")

    with torch.no_grad():
        eager = step(q, k, v, g, kwargs["initial_state"])
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend=COMPILER)(q, k, v, g, kwargs["initial_state"])
    for a, b, what in zip(compiled, eager, ("o", "final state")):
        assert_rel(a, b, 1e-6, what)


def test_value_checks_stay_on_under_compile():
    """A positive log decay fails inside the compiled graph too (as torch._assert_async, no host sync). CPU
    tensors, where the assertion raises at the call (on CUDA tensors it is a device-side assertion:
    tests/kernels/test_checks.py)."""
    q, k, v, g = (t.detach().cpu() for t in _gla_args()[0])
    bad = g.clone()
    bad[0, 3, 1, 2] = 0.5
    torch._dynamo.reset()
    fn = torch.compile(lambda g: ops.gla(q, k, v, g, backend="reference")[0], fullgraph=True, backend=COMPILER)
    fn(g)
    with pytest.raises(RuntimeError, match="g holds log decays and must be <= 0"):
        fn(bad)


def test_boundary_check_stays_on_under_compile():
    """Boundaries outside [0, 1] fail inside the compiled segment_pool too (an async assert, no host sync); CPU
    tensors, as above."""
    (x, b), kwargs = _pool_args()
    x, b = x.detach().cpu(), b.detach().cpu()
    bad = b.clone()
    bad[1, 4] = 1.5
    torch._dynamo.reset()
    fn = torch.compile(lambda b: ops.segment_pool(x, b, **kwargs, backend="reference"), fullgraph=True,
                       backend=COMPILER)
    fn(b)
    with pytest.raises(RuntimeError, match=r"boundaries must lie in \[0, 1\]"):
        fn(bad)
