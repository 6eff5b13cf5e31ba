"""RoPE's rotation (seqmix/kernels/rotary.py): the C++ CPU kernel against the tensor ops in float64 (the rotation
and its gradients) and float32 against float64, on the layouts attention hands it (q and k as views of the split
projection, dense, packed and decoding positions), head dims that are not a multiple of a vector, the automatic
choice and its fallbacks, bad input, and the custom op under opcheck and torch.compile."""

import pytest
import torch

from seqmix.archs.attention import rotary_frequencies
from seqmix.kernels import BackendUnavailable, cpu
from seqmix.kernels.backend import recording
from seqmix.kernels.rotary import _rotate, rotate_halves, rotate_halves_reference
from tests.helpers import TOL, assert_rel, require_cpu_kernels


@pytest.fixture(autouse=True)
def kernels_built():
    require_cpu_kernels()


def _angles(positions, D, dtype):
    angles = positions.to(dtype)[..., None, None] * rotary_frequencies(D, 10000.0, positions.device, dtype)
    return angles.cos(), angles.sin()


def _qk(lead, H, D, dtype, seed):
    """q and k [*lead, H, D] as attention makes them: views of one projection's output (rows 3 H D apart)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(*lead, 3, H, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return qkv, qkv.unbind(-3)


def _run(qkv, q, positions, backend, dy):
    cos, sin = _angles(positions, q.shape[-1], q.dtype)
    y = rotate_halves(q, cos, sin, backend=backend) if backend else rotate_halves_reference(q, cos, sin)
    return y, torch.autograd.grad(y, qkv, dy)[0]


LAYOUTS = {  # x's leading dims and the positions' (the angles repeat along x's rows)
    "dense": ((3, 37), torch.arange(37)),
    "packed": ((41,), torch.cat([torch.arange(20), torch.arange(5, 26)])),
    "decoding": ((4, 1), torch.tensor([[3], [0], [17], [250]])),
}


@pytest.mark.parametrize("D", [2, 8, 34, 64, 96])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_float64_matches_the_tensor_ops(layout, D):
    lead, positions = LAYOUTS[layout]
    qkv, (q, _, _) = _qk(lead, 3, D, torch.float64, D)
    dy = torch.randn(q.shape, dtype=torch.float64)
    with recording() as choices:
        got = _run(qkv, q, positions, "cpu", dy)
    assert [c.backend for c in choices if c.op == "rotate_halves"] == ["cpu"]
    for name, a, b in zip(("y", "dqkv"), got, _run(qkv, q, positions, None, dy), strict=True):
        assert_rel(a, b, 1e-14, f"{layout} D={D}: {name}")


def test_float32_matches_float64():
    lead, positions = LAYOUTS["dense"]
    qkv, (q, _, _) = _qk(lead, 4, 64, torch.float32, 0)
    qkv64, (q64, _, _) = _qk(lead, 4, 64, torch.float64, 0)
    dy = torch.randn(q.shape, dtype=torch.float64)
    for name, a, b in zip(("y", "dqkv"), _run(qkv, q, positions, "cpu", dy.float()), _run(qkv64, q64, positions, None, dy),
                          strict=True):
        assert a.dtype == torch.float32
        assert_rel(a, b, TOL[torch.float32], name)


def test_the_automatic_choice_and_its_fallbacks():
    """The kernel where it serves (angles per token, or per batch row and token); the tensor ops for bfloat16,
    angles broadcast otherwise (positions [1, T] for x [2, T, ...]) and heads that are not contiguous; asked for by
    name where it cannot serve, a refusal."""
    positions = torch.arange(6)
    cos, sin = _angles(positions, 8, torch.float32)
    x = torch.randn(2, 6, 3, 8)
    per_row, broadcast = (_angles(p, 8, torch.float32) for p in (torch.arange(12).view(2, 6), positions[None]))
    cases = {"cpu": (x, cos, sin), "cpu per row": (x, *per_row), "bfloat16": (x.bfloat16(), cos.bfloat16(), sin.bfloat16()),
             "positions [1, T]": (x, *broadcast),
             "heads apart": (x.transpose(-2, -1).contiguous().transpose(-2, -1), cos, sin)}
    for case, args in cases.items():
        with recording() as choices:
            y = rotate_halves(*args)
        kernel = case.startswith("cpu")
        assert [c.backend for c in choices] == ["cpu" if kernel else "reference"], case
        assert_rel(y.float(), rotate_halves_reference(*args).float(), 1e-6, case)
        if not kernel:
            with pytest.raises(BackendUnavailable):
                rotate_halves(*args, backend="cpu")


def test_bad_input_to_the_kernel():
    rotate = cpu.extension().rotate_halves
    x, cs = torch.randn(4, 2, 8), torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="D even"):
        rotate(torch.randn(4, 2, 7), cs, cs, False)
    with pytest.raises(RuntimeError, match="must be a multiple of cos's P"):
        rotate(x, torch.randn(3, 4), torch.randn(3, 4), False)
    with pytest.raises(RuntimeError, match=r"cos and sin must be \[P, D/2\]"):
        rotate(x, torch.randn(4, 3), torch.randn(4, 3), False)
    with pytest.raises(RuntimeError, match="dtype"):
        rotate(x, cs.double(), cs.double(), False)


def test_the_custom_op_under_opcheck_and_compile():
    x, (cos, sin) = torch.randn(6, 2, 8, requires_grad=True), _angles(torch.arange(6), 8, torch.float32)
    torch.library.opcheck(_rotate.op, (x, cos.reshape(6, 4), sin.reshape(6, 4), False))
    positions = torch.arange(6)

    def rotated(x):
        cos, sin = _angles(positions, 8, torch.float32)
        return rotate_halves(x, cos, sin)

    x = torch.randn(2, 6, 2, 8)
    compiled = torch.compile(rotated, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), rotated(x))
