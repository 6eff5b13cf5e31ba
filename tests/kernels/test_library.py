"""seqmix/kernels/library.py: eager calls take the op's implementation inside an autograd.Function, with the
gradients of the torch.library op; torch.compile, fake tensors and tensor subclasses take the torch.library op;
an op without autograd keeps torch's handling."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

from seqmix.kernels.library import CustomOp, custom_op

calls = {"fn": 0}


@custom_op("seqmix_test::scaled_cube", mutates_args=())
def scaled_cube(x: torch.Tensor, scale: float, shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale x^3 (+ shift), x^2): the second output is what the backward reads."""
    calls["fn"] += 1
    square = x * x
    y = scale * square * x
    return (y if shift is None else y + shift), square


@scaled_cube.register_fake
def _(x, scale, shift):
    return torch.empty_like(x), torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.scale = inputs[1]
    ctx.save_for_backward(output[1])


def _backward(ctx, dy, _dsquare):
    (square,) = ctx.saved_tensors
    return 3 * ctx.scale * square * dy, None, dy if ctx.needs_input_grad[2] else None


scaled_cube.register_autograd(_backward, setup_context=_setup_context)


@custom_op("seqmix_test::doubled", mutates_args=())
def doubled(x: torch.Tensor) -> torch.Tensor:
    """No autograd registered."""
    return 2 * x


@doubled.register_fake
def _(x):
    return torch.empty_like(x)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64).requires_grad_()
    shift = torch.randn(5, 7, generator=g, dtype=torch.float64).requires_grad_()
    return x, shift, torch.randn(5, 7, generator=g, dtype=torch.float64)


def _grads(call, x, shift, dy):
    y, _ = call(x, 0.7, shift)
    y.backward(dy)
    grads = x.grad.clone(), shift.grad.clone()
    x.grad = shift.grad = None
    return y.detach(), grads


def test_eager_call_skips_torch_library_and_matches_its_gradients():
    x, shift, dy = _inputs()
    before = calls["fn"]
    y, _ = scaled_cube(x, 0.7, shift)
    assert calls["fn"] == before + 1
    # The eager path's node is the Function built from the op's setup_context and backward, not torch.library's.
    assert type(y.grad_fn).__name__ == "seqmix_test_scaled_cubeBackward"
    assert type(scaled_cube.op(x, 0.7, shift)[0].grad_fn).__name__.startswith("GeneratedBackwardFor_seqmix_test")
    y_eager, grads_eager = _grads(scaled_cube, x, shift, dy)
    y_lib, grads_lib = _grads(scaled_cube.op, x, shift, dy)
    torch.testing.assert_close(y_eager, y_lib, rtol=0, atol=0)
    for a, b in zip(grads_eager, grads_lib):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(grads_eager[0], 3 * 0.7 * x.detach() ** 2 * dy)
    # An input that wants no gradient gets none, as on the torch.library path.
    shift_fixed = shift.detach()
    scaled_cube(x, 0.7, shift_fixed)[0].backward(dy)
    assert shift_fixed.grad is None and x.grad is not None


def test_call_without_gradient_is_the_implementation():
    x, shift, _ = _inputs(1)
    with torch.no_grad():
        y, square = scaled_cube(x, 0.7, shift)
    assert y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(square, x.detach() ** 2, rtol=0, atol=0)


def test_compiled_call_equals_eager():
    x, shift, dy = _inputs(2)
    y_eager, grads_eager = _grads(scaled_cube, x, shift, dy)
    compiled = torch.compile(lambda a, s: scaled_cube(a, 0.7, s), backend="aot_eager", fullgraph=True)
    y = compiled(x, shift)[0]
    y.backward(dy)
    torch.testing.assert_close(y.detach(), y_eager)
    torch.testing.assert_close(x.grad, grads_eager[0])
    torch.testing.assert_close(shift.grad, grads_eager[1])


def test_fake_tensors_take_the_fake_implementation():
    before = calls["fn"]
    with FakeTensorMode():
        x = torch.empty(3, 4)
        y, square = scaled_cube(x, 2.0, None)
    assert calls["fn"] == before  # the fake, not the implementation
    assert y.shape == (3, 4) and square.shape == (3, 4)


class _Tagged(torch.Tensor):
    """A tensor subclass with its own dispatch, which records the ops that reach it."""

    seen: list[str] = []

    @staticmethod
    def __new__(cls, data):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype, requires_grad=False)

    def __init__(self, data):
        self.data_ = data

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        unwrap = lambda t: t.data_ if isinstance(t, _Tagged) else t  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        return tree_map(lambda t: _Tagged(t) if isinstance(t, torch.Tensor) else t, out)


def test_tensor_subclass_takes_the_torch_library_op():
    x = _Tagged(torch.randn(3, 4, dtype=torch.float64))
    _Tagged.seen.clear()
    y, _ = scaled_cube(x, 0.5, None)
    assert _Tagged.seen[0].startswith("seqmix_test.scaled_cube")  # the op itself, not its implementation's ops
    assert isinstance(y, _Tagged)
    torch.testing.assert_close(y.data_, 0.5 * x.data_ ** 3)


def test_torch_func_transforms_take_the_torch_library_op():
    """vmap's batched tensors are plain torch.Tensors to Python: the call must still reach the torch.library op,
    which has no batching rule, so torch's fallback calls the implementation once per example (a direct call
    would run it once on the batched tensor)."""
    x = torch.randn(3, 4, dtype=torch.float64)
    before = calls["fn"]
    y = torch.vmap(lambda t: scaled_cube(t, 0.5, None)[0])(x)
    assert calls["fn"] == before + 3
    torch.testing.assert_close(y, 0.5 * x ** 3)


def test_op_without_autograd_keeps_torchs_handling():
    """An op with no registered backward, called on an input that wants a gradient, goes to torch.library, whose
    result cannot be differentiated through: backward raises rather than returning a wrong (zero) gradient."""
    assert isinstance(doubled, CustomOp)
    x = torch.randn(4, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(doubled(x), 2 * x.detach())
    with pytest.raises(RuntimeError):
        doubled(x).sum().backward()


def test_bind_is_the_implementation_only_where_a_call_now_would_run_it():
    """A step bound once for a loop of calls (the layers' cpu_decoding_step) skips the per-call checks only where
    every call would have taken the implementation: autograd off, eager, no dispatch mode, plain fixed tensors;
    under each of those conditions it is the op, which still chooses per call."""
    shift = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        bound = scaled_cube.bind(shift)
        assert bound is scaled_cube.fn
        x = torch.randn(3, 4, dtype=torch.float64)
        torch.testing.assert_close(bound(x, 0.5, shift)[0], 0.5 * x ** 3 + shift)
        assert scaled_cube.bind(_Tagged(shift)) is scaled_cube
        with FakeTensorMode():
            assert scaled_cube.bind(torch.empty(3, 4)) is scaled_cube
        assert torch.compile(lambda s: scaled_cube.bind(s) is scaled_cube, backend="eager", fullgraph=True)(shift)
    assert scaled_cube.bind(shift) is scaled_cube  # autograd on: a call may want the autograd.Function


def _reference_calls():
    """(name, inputs, call) of every op whose reference is an autograd.Function with products inside."""
    from seqmix.kernels import (causal_conv1d, delta_rule, dynamic_conv, gated_delta_rule, gla, light_conv,
                                selective_scan, ssd)

    B, T, H, K = 2, 37, 2, 8
    g = torch.Generator().manual_seed(11)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    q, k, v, x = randn(B, T, H, K), F.normalize(randn(B, T, H, K), dim=-1), randn(B, T, H, K), randn(B, T, 16)
    beta, decay = torch.rand(B, T, H, generator=g), -torch.rand(B, T, H, generator=g)
    dt, A = torch.rand(B, T, H, generator=g), -torch.rand(H, generator=g)
    delta, A_scan = torch.rand(B, T, 16, generator=g), -torch.rand(16, 4, generator=g)

    def with_state(op):
        return lambda *a: op(*a, output_final_state=True, backend="reference")

    return [
        ("delta_rule", (q, k, v, beta), with_state(delta_rule)),
        ("gated_delta_rule", (q, k, v, decay, beta), with_state(gated_delta_rule)),
        ("gla", (q, k, v, F.logsigmoid(randn(B, T, H, K))), with_state(gla)),
        ("ssd", (v, dt, A, randn(B, T, 1, K), randn(B, T, 1, K)), with_state(ssd)),
        ("selective_scan", (x, delta, A_scan, randn(B, T, 4), randn(B, T, 4)), with_state(selective_scan)),
        ("causal_conv1d", (x, randn(16, 4)), with_state(causal_conv1d)),
        ("light_conv", (x, randn(2, 5)), lambda *a: (light_conv(*a, backend="reference"),)),
        ("dynamic_conv", (x, randn(B, T, 2, 5)), lambda *a: (dynamic_conv(*a, backend="reference"),)),
    ]


@pytest.mark.parametrize("case", _reference_calls(), ids=lambda case: case[0])
def test_references_compute_in_their_dtype_under_autocast(case):
    """Under bfloat16 autocast a float32 call gives what it gives without, bit for bit, forward and backward
    (the references' products in bfloat16 failed: no bfloat16 triangular solve, bfloat16 next to float32)."""
    _, inputs, call = case
    results = []
    for enabled in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            outputs = [o for o in call(*leaves) if o is not None]
        sum(o.square().sum() for o in outputs).backward()
        results.append([*outputs, *(t.grad for t in leaves)])
    for without, under in zip(*results, strict=True):
        assert under.dtype == without.dtype and torch.equal(under, without)
