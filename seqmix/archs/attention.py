"""Causal softmax attention with rotary positions: the baseline mixer, and the one hybrids mix in."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from seqmix.archs.mixer import Mixer, State, register_mixer, take_step
from seqmix.archs.modules import Linear
from seqmix.kernels import step_cpu
from seqmix.kernels.backend import Choice, report, reporting
from seqmix.kernels.rotary import rotate_halves
from seqmix.kernels.sequences import in_dtype, reference_dtype
from seqmix.kernels.step_cpu import StateOf


def rotary_frequencies(head_dim: int, theta: float, device, dtype) -> torch.Tensor:
    """RoPE's frequencies theta^(-j / (head_dim / 2)), j < head_dim / 2, in ``dtype``: [head_dim / 2]."""
    half = head_dim // 2
    return theta ** (-torch.arange(half, device=device, dtype=dtype) / half)


def rotary(positions: torch.Tensor, theta: float, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rotate each x [..., T, H, D] of ``xs`` by the positions [..., T] (RoPE, halves layout), in float32
    (float64 for float64 x); the angles are computed once for all of them."""
    dt = reference_dtype(xs[0])
    inv_freq = rotary_frequencies(xs[0].shape[-1], theta, positions.device, dt)
    angles = positions.to(dt)[..., None, None] * inv_freq  # [..., T, 1, D/2]
    cos, sin = angles.cos(), angles.sin()
    return tuple(rotate_halves(in_dtype(x, dt), cos, sin).to(x.dtype) for x in xs)


# Looked up once: a lookup inside a traced forward is a graph break (torch.compile skips importlib).
FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None


def _masked_attention(q, k, v, mask, backend):
    """softmax(q k^T / sqrt(D) where mask) v; q [N,H,Tq,D], k, v [N,H,Tk,D], mask [N,1,Tq,Tk] bool."""
    if backend == "reference":
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return (probs @ v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@register_mixer("attention")
class Attention(Mixer):
    """Multi-head causal softmax attention with RoPE, q/k/v and output projections.

    Its decoding state is the key/value cache: ``k``, ``v`` [N, H, L, D] (rotated keys;
    sequence i's entries are the first ``length[i]`` of L, the rest unused and masked: zero until a
    call writes them in place) and
    ``length`` [N] (int64, tokens seen, which is also the next token's position). A state from
    ``init_state(batch_size, capacity=L)`` also holds ``capacity`` [N]: its cache keeps L slots, and
    one-token decoding calls (dense, T = 1) write into them with no host sync and no shape change
    (what ``torch.compile(fullgraph=True)`` and CUDA graphs need); the caller sizes L for all the
    tokens it will decode.

    Args:
        hidden_size: model width.
        num_heads: number of heads H.
        head_dim: dim D per head (default hidden_size // num_heads).
        rope_theta: base of the rotary frequencies.
        backend: ``None`` (flash-attn for training calls on CUDA when it is installed, else
            PyTorch's SDPA), ``"sdpa"``, ``"flash_attn"``, or ``"reference"`` (explicit softmax
            in float32, the oracle of the tests).
    """

    backends = ("reference", "sdpa", "flash_attn")

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None = None,
                 rope_theta: float = 10000.0, backend: str | None = None):
        super().__init__()
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
            head_dim = hidden_size // num_heads
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {head_dim}")
        if backend not in (None, *self.backends):
            raise ValueError(f"backend must be None or one of {self.backends}, got {backend!r}")
        if backend == "flash_attn" and not FLASH_ATTN_INSTALLED:
            raise ValueError("backend='flash_attn' needs the flash-attn package, which is not installed")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.rope_theta, self.backend = rope_theta, backend
        inner = num_heads * head_dim
        self.qkv_proj = Linear(hidden_size, 3 * inner, bias=False)
        self.o_proj = Linear(inner, hidden_size, bias=False)

    def _use_flash(self, x) -> bool:
        """Whether a dense causal call runs flash-attn (else SDPA, or the reference when asked for); the choice is
        reported as the kernels' choices are (seqmix.kernels.backend: explain, recording, the DEBUG log)."""
        if self.backend is not None:
            name, how, passed_over = self.backend, "argument", ()
        else:
            why = (f"flash-attn needs CUDA tensors (got {x.device.type})" if not x.is_cuda
                   else None if FLASH_ATTN_INSTALLED else "the flash-attn package is not installed")
            call_why = None if x.dtype in (torch.float16, torch.bfloat16) else f"flash-attn takes float16 or " \
                                                                              f"bfloat16, got {x.dtype}"
            name, how = ("flash_attn" if why is None and call_why is None else "sdpa"), "automatic"
            passed_over = () if name == "flash_attn" else (("flash_attn", why or call_why, why is None),)
        if reporting():
            report(Choice("attention", name, how, x.device, passed_over))
        return name == "flash_attn"

    def mix(self, x, state: State | None, *, cu_seqlens=None):
        B, T, _ = x.shape
        in_place = cu_seqlens is None and T == 1 and state is not None and "capacity" in state
        step = self.cpu_decoding_step(x, state) if in_place else None
        if step is not None:
            return take_step(step, x, state)
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        if state is None and cu_seqlens is None:
            o = self._dense_causal(q, k, v)
            return self.o_proj(o.flatten(2)), None
        if in_place:
            o, new_state = self._decode_in_place(q, k, v, state)
            return self.o_proj(o.flatten(2)), new_state
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, (B + 1) * T, T, device=x.device)
        elif B != 1:
            raise ValueError(f"with cu_seqlens, x must be packed as [1, total, hidden], got batch {B}")
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))
        o, new_state = self._with_sequences(q, k, v, cu_seqlens, state)
        return self.o_proj(o.view(B, T, -1)), new_state

    def cpu_decoding_step(self, like, state):
        """One token into preallocated caches (a state with ``capacity``) as one C++ call with its projections
        (step_cpu.attention_step), for the automatic backend and caches in the inputs' dtype, float32 or float64.
        Its outputs equal :meth:`_decode_in_place`'s (tests/archs/test_attention.py). See
        :meth:`Mixer.cpu_decoding_step`."""
        if not ("capacity" in state and self.backend is None and state["k"].dtype == like.dtype
                and state["v"].dtype == like.dtype and step_cpu.serves_layer("attention_step", like, state, self)):
            return None
        modules = self._modules
        qkv_weight, o_weight = modules["qkv_proj"]._parameters["weight"], modules["o_proj"]._parameters["weight"]
        frequencies = self._decoding_frequencies()
        return step_cpu.LayerCall(step_cpu.attention_step, (None, qkv_weight, StateOf("k"), StateOf("v"),
                                                            StateOf("length"), frequencies, o_weight), ("length",))

    def _decoding_frequencies(self) -> torch.Tensor:
        w = self.qkv_proj.weight
        return self._decoding_constant(
            "_step_inv_freq", [w], lambda: rotary_frequencies(self.head_dim, self.rope_theta, w.device, w.dtype))

    def _dense_causal(self, q, k, v):
        positions = torch.arange(q.shape[1], device=q.device)
        q, k = rotary(positions, self.rope_theta, q, k)
        if self._use_flash(q):
            from flash_attn import flash_attn_func

            return flash_attn_func(q, k, v, causal=True)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.backend == "reference":
            T = q.shape[2]
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]
            return _masked_attention(q, k, v, mask, "reference").transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    def _with_sequences(self, q, k, v, cu_seqlens, state):
        """Packed tokens q, k, v [L, H, D] of N sequences, continuing their caches when a state is given.

        Each sequence is laid out padded, [N, H, Tmax, D]; a query sees the valid part of its
        sequence's cache and the new keys up to itself.
        """
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
        N, lengths = cu.numel() - 1, cu.diff()
        past = torch.zeros(N, dtype=torch.int64, device=q.device) if state is None else state["length"]
        if past.shape != (N,):
            raise ValueError(f"state['length'] must have shape [{N}] (one entry per sequence), got {tuple(past.shape)}")
        seq = torch.repeat_interleave(torch.arange(N, device=q.device), lengths, output_size=q.shape[0])
        offset = torch.arange(q.shape[0], device=q.device) - cu[seq]
        q, k = rotary(past[seq] + offset, self.rope_theta, q, k)
        t_max = int(lengths.max()) if N else 0

        def padded(t):  # [L, H, D] -> [N, H, Tmax, D]
            out = t.new_zeros(N, t_max, *t.shape[1:])
            out[seq, offset] = t
            return out.transpose(1, 2)

        qp, kp, vp = padded(q), padded(k), padded(v)
        if state is None:
            k_all, v_all, cache_len = kp, vp, 0
        else:
            k_all, v_all, cache_len = (torch.cat([state["k"].to(kp.dtype), kp], 2), torch.cat([state["v"].to(vp.dtype), vp], 2),
                                       state["k"].shape[2])
        rows = torch.arange(t_max, device=q.device)
        sees_cache = torch.arange(cache_len, device=q.device) < past[:, None, None]  # [N, 1, Lc]
        sees_new = (rows[None, :] <= rows[:, None]) & (rows[None, None, :] < lengths[:, None, None])  # [N, Tq, Tmax]
        # A padding query row still sees its own key, so no row is empty (its output is dropped).
        sees_new = sees_new | torch.eye(t_max, dtype=torch.bool, device=q.device)
        mask = torch.cat([sees_cache.expand(N, t_max, cache_len), sees_new], 2)[:, None]
        backend = "reference" if self.backend == "reference" else "sdpa"
        o = _masked_attention(qp, k_all, v_all, mask, backend).transpose(1, 2)[seq, offset]
        if state is None:
            return o, None
        return o, self._append(state, k, v, seq, offset, past, lengths)

    def _decode_in_place(self, q, k, v, state):
        """One token per sequence, q, k, v [B, 1, H, D], into the preallocated cache at slot ``length``:
        the same attention as the packed path, computed over all L slots with the unwritten ones masked.

        Without autograd the cache is written in place: slot ``length`` is beyond what the state passed in
        describes, so that state stays valid (until another token is written from it: one cache, one line
        of decoding). ``length`` is a new tensor. With autograd the cache is copied (a written cache may be
        saved for a backward)."""
        past = state["length"]
        q, k = rotary(past[:, None], self.rope_theta, q, k)
        B, H = q.shape[0], self.num_heads
        slot = (torch.arange(B, device=q.device)[:, None], torch.arange(H, device=q.device)[None, :], past[:, None])
        write = torch.Tensor.index_put if torch.is_grad_enabled() else torch.Tensor.index_put_
        k_all = write(state["k"], slot, k[:, 0].to(state["k"].dtype))
        v_all = write(state["v"], slot, v[:, 0].to(state["v"].dtype))
        mask = (torch.arange(k_all.shape[2], device=q.device) <= past[:, None])[:, None, None, :]  # [B, 1, 1, L]
        backend = "reference" if self.backend == "reference" else "sdpa"
        o = _masked_attention(q.transpose(1, 2), k_all.to(q.dtype), v_all.to(q.dtype), mask, backend)
        return o.transpose(1, 2), {**state, "k": k_all, "v": v_all, "length": past + 1}

    @staticmethod
    def _append(state, k, v, seq, offset, past, lengths):
        """The caches with the new keys/values [L, H, D] written after each sequence's valid entries
        (grown when they run out of slots, never shrunk). Where they fit, without autograd, they are written
        in place (as :meth:`_decode_in_place` does: a prefill into a preallocated cache copies nothing)."""
        new_len = past + lengths
        capacity = max(int(new_len.max()) if new_len.numel() else 0, state["k"].shape[2])
        if capacity == state["k"].shape[2] and not torch.is_grad_enabled():
            for name, new in (("k", k), ("v", v)):
                state[name][seq, :, past[seq] + offset] = new.to(state[name].dtype)
            return {**state, "length": new_len}
        out = {}
        for name, new in (("k", k), ("v", v)):
            cache = state[name]
            grown = cache.new_zeros(cache.shape[0], cache.shape[1], capacity, cache.shape[3])
            keep = min(cache.shape[2], capacity)
            grown[:, :, :keep] = cache[:, :, :keep]
            grown[seq, :, past[seq] + offset] = new.to(cache.dtype)
            out[name] = grown
        out["length"] = new_len
        if "capacity" in state:
            out["capacity"] = torch.full_like(state["capacity"], capacity)
        return out

    def init_state(self, batch_size: int, capacity: int = 0) -> State:
        """The empty cache; ``capacity`` > 0 preallocates that many slots for in-place decoding."""
        w = self.qkv_proj.weight
        empty = torch.zeros(batch_size, self.num_heads, capacity, self.head_dim, device=w.device, dtype=w.dtype)
        state = {"k": empty, "v": empty.clone(), "length": torch.zeros(batch_size, dtype=torch.int64, device=w.device)}
        if capacity:
            state["capacity"] = torch.full((batch_size,), capacity, dtype=torch.int64, device=w.device)
        return state

    def sequence_state(self, state: State, i: int) -> State:
        n = int(state["length"][i])
        return {"k": state["k"][i, :, :n], "v": state["v"][i, :, :n], "length": state["length"][i]}
