"""The Mixer contract, as checks any mixer can be run through.

- Running a sequence in pieces with the state equals one full call (outputs and each sequence's state).
- Prefill then one-token decoding equals the training call.
- Left padding with ``attention_mask`` and packing with ``cu_seqlens`` equal separate calls.
"""

import torch

from tests.helpers import DEVICE, assert_rel


def pieces_equal_one_call(layer, x, cuts, tol, one_call=None):
    """``one_call``: ``layer(x, layer.init_state(B))`` without gradients, when the caller already has it."""
    B, T, _ = x.shape
    with torch.no_grad():
        full, full_state = one_call or layer(x, layer.init_state(B))
        state, pieces = layer.init_state(B), []
        bounds = [0, *sorted(set(cuts)), T]
        for s, e in zip(bounds[:-1], bounds[1:]):
            y, state = layer(x[:, s:e], state)
            pieces.append(y)
    assert_rel(torch.cat(pieces, 1), full, tol, f"output in pieces {bounds}")
    assert state.keys() == full_state.keys()
    got, want = _as_read(layer, state, B), _as_read(layer, full_state, B)
    assert got.keys() == want.keys()
    for name in want:
        assert_rel(got[name], want[name], tol, f"state {name!r} in pieces {bounds}")


def _as_read(layer, state, B):
    """The batch's state as its sequences read it (Mixer.sequence_state: a cache up to each sequence's length, not
    the slots past it, which a batched step may have written for a sequence that keeps its length), each tensor the
    sequences' parts flattened and joined."""
    parts = [layer.sequence_state(state, i) for i in range(B)]
    return {name: torch.cat([part[name].reshape(-1) for part in parts]) for name in parts[0]}


def decoding_equals_training_call(layer, x, prefill, tol):
    B, T, _ = x.shape
    with torch.no_grad():
        full, _ = layer(x)
        y, state = layer(x[:, :prefill], layer.init_state(B))
        steps = [y]
        for t in range(prefill, T):
            y, state = layer(x[:, t : t + 1], state)
            steps.append(y)
    assert_rel(torch.cat(steps, 1), full, tol, "decoded output")


def padding_and_packing_equal_separate_calls(layer, xs, tol):
    """``xs``: [1, T_i, hidden] sequences of different lengths."""
    lengths = [x.shape[1] for x in xs]
    n, T, hidden = len(xs), max(lengths), xs[0].shape[-1]
    device = xs[0].device
    with torch.no_grad():
        separate = [layer(x, layer.init_state(1)) for x in xs]
        padded = torch.zeros(n, T, hidden, device=device)
        mask = torch.zeros(n, T, dtype=torch.long, device=device)
        for i, (x, t) in enumerate(zip(xs, lengths)):
            padded[i, T - t :] = x[0]
            mask[i, T - t :] = 1
        y_pad, s_pad = layer(padded, layer.init_state(n), attention_mask=mask)
        cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
        y_packed, s_packed = layer(torch.cat(xs, 1), layer.init_state(n), cu_seqlens=cu)
    assert not y_pad[mask == 0].any(), "outputs at padded positions must be zero"
    for i, ((y, s), t) in enumerate(zip(separate, lengths, strict=True)):
        assert_rel(y_pad[i, T - t :], y[0], tol, f"left-padded output of sequence {i}")
        assert_rel(y_packed[0, int(cu[i]) : int(cu[i + 1])], y[0], tol, f"packed output of sequence {i}")
        alone = layer.sequence_state(s, 0)
        for name, value in alone.items():
            assert_rel(layer.sequence_state(s_pad, i)[name], value, tol, f"left-padded state {name!r} of sequence {i}")
            assert_rel(layer.sequence_state(s_packed, i)[name], value, tol, f"packed state {name!r} of sequence {i}")


def fused_matches_reference(make_layer, x, tol, expected_params=()):
    """The layer built by ``make_layer(backend)`` with the Triton backend against the same layer
    (same seed) with the reference backend: outputs, and the gradients of x and every parameter
    for a squared-sum loss. ``expected_params`` must be among the parameters compared."""
    outs, grads, names = {}, {}, None
    for backend in ("triton", "reference"):
        layer = make_layer(backend).to(DEVICE)
        xb = x.to(DEVICE).clone().requires_grad_()
        y, _ = layer(xb)
        y.square().sum().backward()
        outs[backend] = y
        grads[backend] = [xb.grad] + [p.grad for p in layer.parameters()]
        names = ["x"] + [n for n, _ in layer.named_parameters()]
    assert set(expected_params) <= set(names), f"{expected_params} not among {names}"
    assert_rel(outs["triton"], outs["reference"], tol, "output")
    for name, a, b in zip(names, grads["triton"], grads["reference"], strict=True):
        assert_rel(a, b, tol, f"grad of {name}")


def fused_decoding_step_equals_tensor_op_steps(layer, x, prefill, op, monkeypatch):
    """A layer whose decoding step is one C++ call with its projections on the CPU (``op``, recorded as the
    ``cpu`` choice; seqmix/kernels/step_cpu.py): with its parameters moved off their initial values, the
    decoded outputs and states equal the tensor-op steps' (``SEQMIX_BACKEND=reference``) to 1e-12 in float64 and
    1e-5 in float32, and the outputs equal the training call; one step traced with ``fullgraph=True`` (Dynamo's
    eager backend) equals the eager step. CPU tensors, the C++ kernels built (the caller skips otherwise)."""
    from seqmix.kernels.backend import recording

    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    for dtype in (torch.float64, torch.float32):
        layer, x = layer.to(dtype), x.to(dtype)

        with recording() as choices:
            y, state = _decode(layer, layer, x, prefill)
        assert (op, "cpu") in {(c.op, c.backend) for c in choices}
        with torch.no_grad():
            full, _ = layer(x)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert_rel(y, full, tol * 10, f"{dtype}: decoded output against the training call")
        monkeypatch.setenv("SEQMIX_BACKEND", "reference")
        with recording() as choices:
            want, want_state = _decode(layer, layer, x, prefill)
        monkeypatch.delenv("SEQMIX_BACKEND")
        taken = {(c.op, c.backend) for c in choices}
        assert (op, "reference") in taken and (op, "cpu") not in taken
        assert_rel(y, want, tol, f"{dtype}: decoded output against the tensor-op steps")
        assert state.keys() == want_state.keys()
        for name in state:
            assert state[name].dtype == want_state[name].dtype
            assert_rel(state[name], want_state[name], tol, f"{dtype}: state {name!r} against the tensor-op steps")
    torch._dynamo.reset()
    got, got_state = _decode(layer, torch.compile(layer, fullgraph=True, backend="eager"), x, prefill)
    torch.testing.assert_close(got, y, rtol=0, atol=0)
    for name in state:
        torch.testing.assert_close(got_state[name], state[name], rtol=0, atol=0)


def _decode(layer, step, x, prefill):
    """x's first ``prefill`` tokens through ``layer``, then one token at a time through ``step`` (the layer or
    its compiled form): the outputs [B, T, hidden] and the final state."""
    with torch.no_grad():
        y, state = layer(x[:, :prefill], layer.init_state(x.shape[0]))
        steps = [y]
        for t in range(prefill, x.shape[1]):
            y, state = step(x[:, t : t + 1], state)
            steps.append(y)
    return torch.cat(steps, 1), state
