"""The contract every stateful op shares (seqmix/kernels/op.py), checked the same way for each:
calls with no tokens, float64 inputs, inputs on two devices, fused kernels against a float64
oracle, gradients compared on one random loss of both outputs, and the packed-sequence cases the
tests draw. Each family's tests call these with its op and inputs, as tests/archs/contract.py does
for the layers."""

import pytest
import torch
from hypothesis import strategies as st

from seqmix.kernels import BackendUnavailable
from tests.helpers import DEVICE, TOL, assert_rel


class PackedSequences:
    """What a case with ``batch`` and ``lengths`` (packed lengths, or None for dense) says about its sequences."""

    @property
    def num_sequences(self) -> int:
        return self.batch if self.lengths is None else len(self.lengths)

    def cu_seqlens(self, device):
        if self.lengths is None:
            return None
        cu = torch.zeros(len(self.lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(self.lengths).cumsum(0)
        return cu.to(device)


def draw_sequences(draw, max_t: int, max_parts: int):
    """(batch, packed lengths or None, total length): dense batches of 1-2, or up to ``max_parts``
    packed sequences (zero-length ones included)."""
    if draw(st.booleans()):
        lengths = tuple(draw(st.lists(st.integers(0, max_t // 2), min_size=1, max_size=max_parts)))
        if sum(lengths) == 0:
            lengths = lengths + (1,)
        return 1, lengths, sum(lengths)
    seqlen = draw(st.integers(1, max_t))
    return draw(st.integers(1, 2)), None, seqlen


# Bad boundaries for a batch packed as one sequence of 16 tokens, and what each must raise.
BAD_CU_SEQLENS = [
    ([1, 4, 16], "must start at 0"),
    ([0, 9, 4, 16], "non-decreasing"),
    ([0, 4, 15], "must end at the packed length T=16"),
    ([[0, 16]], r"shape \[N\+1\]"),
    ([0], r"shape \[N\+1\]"),
]


def check_bad_cu_seqlens(op, packed: dict, cu, match: str, backend) -> None:
    with pytest.raises(ValueError, match=match):
        op(**packed, cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=DEVICE), backend=backend)


def check_no_tokens(op, empty: dict, out_shape, state_shape, backend) -> None:
    """No tokens (T = 0, or an empty batch B = 0): an empty output, and the initial state (or zeros) as the final
    state. The C++ kernels (backend "cpu") take CPU tensors wherever the tests' DEVICE is."""
    if backend == "cpu":
        empty = {n: t.cpu() for n, t in empty.items()}
    h0 = torch.randn(*state_shape, device=next(iter(empty.values())).device)
    out, s = op(**empty, initial_state=h0, output_final_state=True, backend=backend)
    assert out.shape == out_shape
    torch.testing.assert_close(s, h0)
    out, s = op(**empty, output_final_state=True, backend=backend)
    assert s.shape == state_shape and not s.any()


def check_float64_goes_to_the_reference(op, inputs: dict, names: str) -> None:
    """float64 inputs: the automatic choice takes the reference; Triton, named, refuses them."""
    x = {n: t.double() for n, t in inputs.items()}
    with pytest.raises(BackendUnavailable, match=f"'triton' cannot serve this call: {names} must be .*float64"):
        op(**x, backend="triton")
    out, _ = op(**x)
    assert out.dtype == torch.float64


def check_mismatched_devices(op, inputs: dict, name: str) -> None:
    x = dict(inputs)
    x[name] = x[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but the inputs are on"):
        op(**x)


def check_chunked_matches_recurrence(recurrent, chunked, inputs, call, chunk_size) -> None:
    """The chunked reference's output and final state equal the token-by-token recurrence's to
    1e-12 (float64): ``call(fn, *inputs, **options)`` runs either on ``inputs``."""
    o_ref, s_ref = call(recurrent, *inputs)
    o, s = call(chunked, *inputs, chunk_size=chunk_size)
    assert_rel(o, o_ref, 1e-12, "output")
    assert_rel(s, s_ref, 1e-12, "final state")


def check_chunked_gradients_match_recurrence(recurrent, chunked, inputs, call, names, seed, tol) -> None:
    """The chunked reference's gradients equal the token-by-token recurrence's, in float64:
    ``call(fn, *inputs)`` runs either on ``inputs`` (None where absent), ``names`` name every input."""
    inputs = [None if t is None else t.double().detach().requires_grad_() for t in inputs]
    results = [outputs_and_grads(lambda *x, fn=fn: call(fn, *x), inputs, seed) for fn in (recurrent, chunked)]
    assert_grads([n for n, t in zip(names, inputs) if t is not None], results[1][2], results[0][2], tol)


def outputs_and_grads(fn, inputs, seed):
    """``fn(*inputs)`` -> (o, final state), and the gradients of the inputs that are not None
    for a loss with random weights (drawn from ``seed``) on both outputs, taken in float64."""
    o, s = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o.device)
    dht = torch.randn(s.shape, generator=gen).to(s.device)
    loss = (o.double() * do.double()).sum() + (s.double() * dht.double()).sum()
    return o, s, torch.autograd.grad(loss, [t for t in inputs if t is not None])


def assert_grads(names, grads, ref_grads, tol, dg_scale=False):
    """Relative error of every gradient. g's gradient is measured against at least 1e-3 of the
    size of the q, k, v gradients: it vanishes exactly where g cannot act (one token per sequence
    and no initial state), and round-off cannot. With ``dg_scale`` it is measured against their
    full size: dg is the difference of O(1) terms (rowsums of q*dq and k*dk), and where decays of
    exp(-20) per token leave the output all but independent of g, dg is ~1e-9 and the float32
    round-off of those terms dominates any measure relative to dg itself."""
    natural = max(ref_grads[names.index(n)].norm().item() for n in ("q", "k", "v"))
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert torch.isfinite(a).all(), f"d{name} is not finite"
        if name != "g":
            assert_rel(a, b, tol, f"d{name}")
            continue
        floor = natural if dg_scale else 1e-3 * natural
        err = (a.double().cpu() - b.double().cpu()).norm().item() / max(b.norm().item(), floor)
        assert err <= tol, f"dg: relative error {err:.3e} > {tol:.1e}"


def check_against_oracle(op, oracle, names, inputs, kwargs_of, seed, dtype, final_state=True):
    """Run ``op(*inputs[:5], **kwargs_of(inputs), output_final_state=final_state)`` and ``oracle``
    (same call on float64 copies, always with the final state) and compare; with
    ``final_state=False`` no gradient flows in through the state. ``names`` name the inputs
    (None entries are absent). Returns the op's (output, final state)."""
    y, s = op(*inputs[:5], **kwargs_of(inputs), output_final_state=final_state)
    up = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    y_ref, s_ref = oracle(*up[:5], **kwargs_of(up), output_final_state=True)
    tol = TOL[dtype]
    assert y.dtype == dtype
    assert_rel(y, y_ref, tol, "output")
    if final_state:
        assert s.dtype == torch.float32
        assert_rel(s, s_ref, tol, "final state")
    else:
        assert s is None
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y.shape, generator=g).to(y.device)
    ds = torch.randn(s_ref.shape, generator=g).to(y.device) if final_state else torch.zeros(s_ref.shape, device=y.device)
    named = [(n, t) for n, t in zip(names, inputs, strict=True) if t is not None and t.requires_grad]
    loss = (y.float() * dy).sum() + ((s * ds).sum() if final_state else 0)
    grads = torch.autograd.grad(loss, [t for _, t in named])
    ref_up = [u for t, u in zip(inputs, up, strict=True) if t is not None and t.requires_grad]
    ref_grads = torch.autograd.grad((y_ref * dy.double()).sum() + (s_ref * ds.double()).sum(), ref_up)
    for (name, t), a, b in zip(named, grads, ref_grads, strict=True):
        assert a.dtype == t.dtype
        assert_rel(a, b, tol, f"d{name}")
    return y, s


def steps_equal_recurrence(run_steps, run_reference, inputs, dtype):
    """A one-token decoding step chained over T tokens (``run_steps(*inputs) -> (out [B, T, ...], state)``)
    against the step-by-step oracle (``run_reference``, same arguments) from the same random initial
    state (the last of ``inputs``): outputs and final states in ``dtype``; in float64 also the gradients
    of every input, initial state included, for one random loss of both results."""
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    inputs = [t.to(dtype).requires_grad_(t.is_floating_point() and dtype == torch.float64) for t in inputs]
    results = {}
    for name, run in (("steps", run_steps), ("oracle", run_reference)):
        out, state = run(*inputs)
        grads = None
        if dtype == torch.float64:
            gen = torch.Generator().manual_seed(5)
            loss = sum((r * torch.randn(r.shape, generator=gen, dtype=dtype).to(r.device)).sum() for r in (out, state))
            grads = torch.autograd.grad(loss, [t for t in inputs if t.requires_grad])
        results[name] = out, state, grads
    (out, state, grads), (out_ref, state_ref, grads_ref) = results["steps"], results["oracle"]
    assert out.dtype == dtype and state.dtype == dtype
    assert_rel(out, out_ref, tol, "output of the chained steps")
    assert_rel(state, state_ref, tol, "final state of the chained steps")
    for i, (g, g_ref) in enumerate(zip(grads or (), grads_ref or (), strict=True)):
        assert_rel(g, g_ref, tol, f"gradient of input {i}")
