"""Mamba specifics: the fused layer against the reference layer with gradients, the usual
initialisation, configuration errors, and the decoding step (the one-call C++ step, compiled and eager;
the Mixer contract is in test_mixers.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from seqmix.archs import Mamba
from seqmix.kernels.backend import recording
from tests.archs import contract
from tests.helpers import TOL, assert_rel, require_cpu_kernels


def _layer(backend):
    torch.manual_seed(3)
    return Mamba(hidden_size=16, d_state=4, backend=backend)


def test_triton_layer_matches_reference_layer_with_gradients():
    x = torch.randn(2, 70, 16, generator=torch.Generator().manual_seed(1))
    contract.fused_matches_reference(_layer, x, TOL[torch.float32])


def test_layer_on_the_cpu_kernel_matches_reference_layer_with_gradients(monkeypatch):
    """The automatic choice on CPU tensors (the C++ scan, when it builds) against the reference layer."""
    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    x = torch.randn(2, 70, 16, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for backend in (None, "reference"):
        layer = _layer(backend)
        xb = x.clone().requires_grad_()
        with recording() as choices:
            y, _ = layer(xb)
        y.square().sum().backward()
        outs.append(y)
        grads.append([xb.grad] + [p.grad for p in layer.parameters()])
        scans = [c.backend for c in choices if c.op == "selective_scan"]
        assert scans == ["cpu" if backend is None else "reference"]
    assert_rel(outs[0], outs[1], TOL[torch.float32], "output")
    for name, a, b in zip(["x"] + [n for n, _ in _layer(None).named_parameters()], *grads, strict=True):
        assert_rel(a, b, TOL[torch.float32], f"grad of {name}")


def _layer_oracle(layer, x):
    """The layer's training forward written out from its definition in float64: one in_proj split in halves, a
    depthwise conv1d, x_proj, dt_proj with its bias, softplus, and the token-by-token scan."""
    from seqmix.kernels.mamba.reference import selective_scan_recurrent

    T, W = x.shape[1], layer.conv.kernel_size
    xs, z = F.linear(x, layer.in_proj.weight).chunk(2, dim=-1)
    xs = F.silu(F.conv1d(xs.transpose(1, 2), layer.conv.weight.unsqueeze(1), layer.conv.bias, padding=W - 1,
                         groups=layer.d_inner)[..., :T].transpose(1, 2))
    dt, b, c = F.linear(xs, layer.x_proj.weight).split([layer.dt_rank, layer.d_state, layer.d_state], dim=-1)
    delta = F.softplus(F.linear(dt, layer.dt_proj.weight, layer.dt_proj.bias))
    y, _ = selective_scan_recurrent(xs, delta, -torch.exp(layer.A_log), b, c, D=layer.D, z=z)
    return F.linear(y, layer.out_proj.weight)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_layer_equals_its_float64_definition_with_gradients(backend, monkeypatch):
    """The layer as it computes (its projections, conv and scan; None: the C++ scan on CPU tensors when it
    builds) against :func:`_layer_oracle`, outputs and the gradients of x and every parameter, in float64."""
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    layer = _layer(backend).double()
    x = torch.randn(2, 21, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for forward in (lambda xb: layer(xb)[0], lambda xb: _layer_oracle(layer, xb)):
        layer.zero_grad()
        xb = x.clone().requires_grad_()
        y = forward(xb)
        (y * torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(5))).sum().backward()
        results.append([y, xb.grad] + [p.grad.clone() for p in layer.parameters()])
    names = ["output", "grad of x"] + [f"grad of {n}" for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, *results, strict=True):
        assert_rel(a, b, 1e-10, name)


def test_initialisation():
    layer = Mamba(hidden_size=100)
    assert layer.d_inner == 200 and layer.d_state == 16 and layer.dt_rank == math.ceil(100 / 16)
    assert layer.x_proj.out_features == 7 + 2 * 16
    assert layer.conv.kernel_size == 4
    torch.testing.assert_close(-torch.exp(layer.A_log.detach()), -torch.arange(1.0, 17.0).expand(200, 16))
    torch.testing.assert_close(layer.D.detach(), torch.ones(200))
    dt = F.softplus(layer.dt_proj.bias.detach())
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 1e-1 * (1 + 1e-5)).all()
    assert dt.log().std() > 0.5  # log-uniform over two decades
    assert layer.dt_proj.weight.abs().max() <= 7**-0.5


def test_state_shapes():
    state = Mamba(hidden_size=16, d_state=4).init_state(3)
    assert state["conv"].shape == (3, 32, 3)
    assert state["ssm"].shape == (3, 32, 4)


def test_configuration_errors():
    with pytest.raises(ValueError, match="must be positive"):
        Mamba(hidden_size=16, d_state=0)


@pytest.mark.parametrize("d_state", [4, 20])
def test_fused_cpu_decoding_step_equals_the_tensor_op_steps(d_state, monkeypatch):
    """State sizes below and above a vector of lanes (not a multiple of it), dt_rank 3."""
    require_cpu_kernels()
    torch.manual_seed(5)
    layer = Mamba(hidden_size=16, d_state=d_state, dt_rank=3)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    contract.fused_decoding_step_equals_tensor_op_steps(layer, x, 4, "mamba_step", monkeypatch)


def test_decode_step_on_the_cpu_kernel_compiles_in_one_graph_and_equals_the_reference(monkeypatch):
    """Decoding without gradients on CPU tensors runs the layer's C++ step (one custom op per layer and token):
    it traces into one graph (torch.compile(fullgraph=True)) and gives the reference step's logits and states."""
    from seqmix.archs.lm import LanguageModel, LMConfig
    require_cpu_kernels()
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    torch.manual_seed(0)
    model = LanguageModel(LMConfig(hidden_size=32, num_heads=2, layers=["mamba", "mamba"])).eval()
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    results = {}
    with torch.no_grad():
        for label, step in (("compiled", torch.compile(model.decode_step, fullgraph=True, backend="eager")),
                            ("eager", model.decode_step), ("reference", model.decode_step)):
            if label == "reference":
                monkeypatch.setenv("SEQMIX_BACKEND", "reference")
            _, state = model(tokens[:, :9], model.init_state(2))
            with recording() as choices:
                outs = []
                for t in range(9, 12):
                    out, state = step(tokens[:, t : t + 1], state)
                    outs.append(out)
            if label == "eager":
                assert {c.backend for c in choices if c.op == "mamba_step"} == {"cpu"}
            results[label] = torch.stack(outs, 1), torch.cat([s["ssm"].flatten() for s in state])
    for label in ("compiled", "eager"):
        assert_rel(results[label][0], results["reference"][0], 1e-5, f"{label} logits")
        assert_rel(results[label][1], results["reference"][1], 1e-5, f"{label} states")


def test_decode_step_follows_an_in_place_change_of_A_log():
    """The step's A (kept between tokens without gradients) is recomputed once A_log changes in place, as an
    optimizer's step or load_state_dict changes it: the step then equals a fresh layer's with the new A_log."""
    torch.manual_seed(0)
    layer = Mamba(hidden_size=16, d_state=4).eval()
    x = torch.randn(2, 1, 16)
    state = {k: torch.randn_like(v) for k, v in layer.init_state(2).items()}
    with torch.no_grad():
        layer.mix(x, state)
        layer.A_log.add_(torch.rand_like(layer.A_log))
        out, new_state = layer.mix(x, state)
        fresh = Mamba(hidden_size=16, d_state=4).eval()
        fresh.load_state_dict(layer.state_dict())
        expected, expected_state = fresh.mix(x, state)
    assert_rel(out, expected, 1e-6, "out")
    assert_rel(new_state["ssm"], expected_state["ssm"], 1e-6, "ssm state")
