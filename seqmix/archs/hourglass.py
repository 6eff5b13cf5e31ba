"""The hourglass: a shortened stack of layers between two full-length ones, with dynamic token pooling
(Nawrot et al. 2023) or H-Net's dynamic chunking (Hwang, Wang, Gu 2025). Decisions: docs/design.md,
"Dynamic token pooling"; the boundary gradient: docs/math/pooling.md.

Pooling modes (``gumbel``, ``whitespace``, ``entropy``, ``fixed``): a boundary token closes its segment;
the segments' means, after a learned null vector, run through the inner layers; token t reads the
inner output of the segments closed up to t (the null before the first), so nothing leaks from the
future. ``hnet``: a boundary starts a chunk; the boundary tokens run through the inner layers and
every token reads the EMA of the chunk outputs up to its own chunk, times a straight-through 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.archs.lm import Block, LMConfig, bound_block_step
from seqmix.archs.mixer import (Mixer, State, init_mixer_state, is_decoding_step, register_mixer,
                                with_parent_backend)
from seqmix.archs.modules import Linear, RMSNorm, no_weight_decay
from seqmix.kernels import chunk_select, ema_dechunk, segment_pool, segment_upsample, step_cpu
from seqmix.kernels.linear import onednn_serves
from seqmix.kernels.pooling import hard_boundaries, segments_of

BOUNDARY_MODES = ("gumbel", "whitespace", "entropy", "fixed", "hnet")
# Bytes that close a word: whitespace and the punctuation that ends one; BOS/EOS (256, 257) close too.
WORD_CLOSERS = tuple(b" \t\n\r.,;:!?)]}\"'") + (256, 257)
# A token is an entropy spike when its next-byte entropy exceeds that of this many tokens before it.
SPIKE_WINDOW = 2
# Weight of the auxiliary boundary loss by mode (H-Net's ratio loss: 0.03 in the paper).
AUX_WEIGHTS = {"gumbel": 1.0, "entropy": 1.0, "hnet": 0.03, "whitespace": 0.0, "fixed": 0.0}


def _rows_where(rows: torch.Tensor, new: State, old: State) -> State:
    """The state ``new`` in the rows where ``rows`` [B] (bool) is set and ``old`` elsewhere, tensor by tensor. A
    tensor that the step wrote in place, or grew, is new's as it is: attention's caches (preallocated, or grown
    along their positions), whose slot written for a row that keeps its old length lies past what that length lets
    it read, and is written again by the row's next token there."""
    kept = {key: torch.where(rows.view(-1, *(1,) * (value.dim() - 1)), value, old[key]) for key, value in new.items()
            if value is not old[key] and value.shape == old[key].shape}
    return new | kept


def _straight_through_one(c: torch.Tensor) -> torch.Tensor:
    """Exactly 1 in the forward, the gradient of c in the backward (H-Net's STE on the selected probability)."""
    return 1.0 + (c - c.detach())


@register_mixer("hourglass")
class Hourglass(Mixer):
    """Pool the sequence at predicted boundaries, run ``layers`` on the shorter sequence, upsample back.

    Args:
        hidden_size: model width (the inner layers have the same width).
        num_heads: heads of the inner mixers that take ``num_heads``.
        layers: the shortened stack, LM-style names (``["attention*8"]``); each is a block with its MLP.
        boundary: ``"gumbel"`` | ``"whitespace"`` | ``"entropy"`` | ``"fixed"`` | ``"hnet"``.
        stride: every ``stride``-th token is a boundary for ``"fixed"``.
        prior: target boundary rate (Binomial prior for gumbel, the ratio loss's 1/N for hnet).
        temperature: of the relaxed Bernoulli (gumbel, training calls only).
        aux_weight: weight of the boundary loss (None: 1 for gumbel and entropy, 0.03 for hnet).
        mixer_options: constructor options of the inner mixers, by name (as ``LMConfig.mixer_options``).
        intermediate_size: the inner blocks' MLP width (LMConfig's default when None).
        norm_eps: epsilon of the inner blocks' and the layer's RMSNorms.
        max_segments: segments kept per sequence in a training call (None: all; a number makes the
            pooling free of host syncs, dropping later segments).
        ema_head_dim: head size of the ``ssd`` call that computes H-Net's EMA (None: largest of
            64, 32, 16, 8, 4, 2, 1 dividing hidden_size).
        init_std: std of the inner MLPs' and the predictor's weights.
        backend: backend of the segment ops, the EMA's ssd, and the inner mixers that have it.
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, layers=("attention*2",), boundary: str = "gumbel",
                 stride: int = 4, prior: float = 0.2, temperature: float = 0.5, aux_weight: float | None = None,
                 mixer_options: dict | None = None, intermediate_size: int | None = None, norm_eps: float = 1e-5,
                 max_segments: int | None = None, ema_head_dim: int | None = None, init_std: float = 0.02,
                 backend: str | None = None):
        super().__init__()
        if boundary not in BOUNDARY_MODES:
            raise ValueError(f"boundary must be one of {BOUNDARY_MODES}, got {boundary!r}")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride!r}")
        if not 0 < prior < 1:
            raise ValueError(f"prior must lie in (0, 1), got {prior!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if backend not in (None, *self.backends):
            raise ValueError(f"backend must be None or one of {self.backends}, got {backend!r}")
        self.hidden_size, self.boundary, self.stride, self.prior = hidden_size, boundary, stride, prior
        self.temperature, self.max_segments, self.backend = temperature, max_segments, backend
        self.aux_weight = AUX_WEIGHTS[boundary] if aux_weight is None else float(aux_weight)
        self.ema_head_dim = ema_head_dim or next(d for d in (64, 32, 16, 8, 4, 2, 1) if hidden_size % d == 0)
        self.inner = self._inner_blocks(hidden_size, num_heads, list(layers), mixer_options or {},
                                        intermediate_size, norm_eps, init_std)
        self.up_norm = RMSNorm(hidden_size, norm_eps)
        if boundary == "hnet":
            self.q_proj = Linear(hidden_size, hidden_size, bias=False)
            self.k_proj = Linear(hidden_size, hidden_size, bias=False)
            self.residual_proj = Linear(hidden_size, hidden_size, bias=False)
            with torch.no_grad():
                self.q_proj.weight.copy_(torch.eye(hidden_size))
                self.k_proj.weight.copy_(torch.eye(hidden_size))
                self.residual_proj.weight.zero_()
        else:
            self.null = nn.Parameter(torch.randn(hidden_size))
            self.down_norm = RMSNorm(hidden_size, norm_eps)
            no_weight_decay(self.null)
        if boundary in ("gumbel", "entropy"):
            self.predictor = nn.Sequential(Linear(hidden_size, hidden_size), nn.GELU(),
                                           Linear(hidden_size, 1))
            for layer in (self.predictor[0], self.predictor[2]):
                nn.init.normal_(layer.weight, std=init_std)
                nn.init.zeros_(layer.bias)
                no_weight_decay(layer.bias)
        self._tokens = None
        self._aux = None

    def _inner_blocks(self, hidden_size, num_heads, layers, options, intermediate_size, norm_eps, init_std):
        names = LMConfig(hidden_size=hidden_size, num_heads=num_heads, layers=layers).layers
        options = {name: with_parent_backend(name, self.backend, options.get(name, {})) for name in set(names)}
        config = LMConfig(hidden_size=hidden_size, num_heads=num_heads, layers=names, norm_eps=norm_eps,
                          intermediate_size=intermediate_size, mixer_options=options)
        config.validate()
        blocks = nn.ModuleList(Block(config, name) for name in config.layers)
        # As the LM initialises its own blocks (seqmix/archs/lm.py); the mixers keep their own init.
        for block in blocks:
            nn.init.normal_(block.mlp.gate_up.weight, std=init_std)
            nn.init.normal_(block.mlp.down.weight, std=init_std / math.sqrt(2 * len(blocks)))
        return blocks

    # --- the Mixer interface -------------------------------------------------------------------

    def observe_tokens(self, tokens: torch.Tensor) -> None:
        self._tokens = tokens

    def forward(self, x, state: State | None = None, *, cu_seqlens=None, attention_mask=None):
        if self.boundary == "whitespace":
            self._packed_tokens = self._call_tokens(x, attention_mask)
        return super().forward(x, state, cu_seqlens=cu_seqlens, attention_mask=attention_mask)

    def _call_tokens(self, x, attention_mask=None):
        """The token ids of the call (:meth:`observe_tokens`'), checked against x [B, T, D], packed as x is."""
        tokens = self._tokens
        if tokens is None or tokens.shape != x.shape[:2]:
            raise ValueError("boundary='whitespace' reads the token ids of the call: call observe_tokens(tokens) "
                             f"with tokens [B, T] = {tuple(x.shape[:2])} first (the LM does)")
        return tokens if attention_mask is None else tokens[attention_mask.bool()][None]

    def mix(self, x, state: State | None, *, cu_seqlens=None):
        B, T, _ = x.shape
        if is_decoding_step(x, state, cu_seqlens):
            return (self._hnet_step if self.boundary == "hnet" else self._pooling_step)(x, state)
        n = B if cu_seqlens is None else cu_seqlens.numel() - 1
        layout = segments_of(torch.zeros(B, T, dtype=torch.bool, device=x.device), B, T, n, cu_seqlens)
        if self.boundary == "hnet":
            return self._mix_hnet(x, state, cu_seqlens, layout)
        return self._mix_pooling(x, state, cu_seqlens, layout)

    def init_state(self, batch_size: int, capacity: int = 0) -> State:
        """The empty state. ``capacity`` (tokens of the longest continuation to come) goes to the inner mixers
        that preallocate (attention: in-place decoding), one position more for the null vector; the
        shortened sequence is never longer than the tokens."""
        device = self.up_norm.weight.device
        inner = [init_mixer_state(block.mixer, batch_size, capacity=capacity + 1 if capacity else 0)
                 for block in self.inner]
        state = {"position": torch.zeros(batch_size, dtype=torch.int64, device=device)}
        if self.boundary == "hnet":
            state["prev"] = torch.zeros(batch_size, self.hidden_size, device=device)
            state["ema"] = torch.zeros(batch_size, self.hidden_size, device=device)
        else:
            # The null vector opens every sequence of the shortened stack: run it now, keep its output.
            with torch.no_grad():
                h = self.down_norm(self.null.expand(batch_size, 1, -1))
                h, inner = self._run_inner(h, inner, None)
                state["last"] = self.up_norm(h)[:, 0].float()
            state["sum"] = torch.zeros(batch_size, self.hidden_size, device=device)
            state["count"] = torch.zeros(batch_size, device=device)
        return {**state, **self._flatten(inner)}

    def sequence_state(self, state: State, i: int) -> State:
        own = {k: v[i] for k, v in state.items() if not k.startswith("inner.")}
        for j, (block, inner) in enumerate(zip(self.inner, self._unflatten(state))):
            own.update({f"inner.{j}.{k}": v for k, v in block.mixer.sequence_state(inner, i).items()})
        return own

    def auxiliary(self, logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The boundary loss of the last training call (weighted, under ``"loss"``), its unweighted value,
        the boundary rate and the mean segment length; and the inner mixers' own, prefixed ``inner.<i>.``."""
        out = {}
        for j, block in enumerate(self.inner):
            for name, value in block.mixer.auxiliary(None).items():
                if name == "loss":
                    out["loss"] = out.get("loss", 0.0) + value
                out[f"inner.{j}.{name}"] = value.detach()
        record, self._aux = self._aux, None
        if record is None:
            return out
        rate = record["hard"].float().mean()
        loss = self._boundary_loss(record, logits)
        out.update({
            "boundary_loss": loss.detach(), "boundary_rate": rate.detach(),
            "mean_segment_length": (1.0 / rate.clamp_min(1.0 / record["hard"].numel())).detach(),
        })
        out["loss"] = out.get("loss", 0.0) + self.aux_weight * loss
        return out

    # --- boundaries ----------------------------------------------------------------------------

    def _positions(self, state, layout):
        """Each token's position in its sequence, continuing from the state."""
        first = layout.cu[:-1][layout.seq]
        pos = torch.arange(layout.seq.numel(), device=first.device) - first
        return pos if state is None else pos + state["position"][layout.seq]

    def _predict(self, x, state):
        """Boundaries [B, T] (a straight-through gradient for gumbel in training calls) and the predictor's
        logits (None for modes without a predictor)."""
        if self.boundary == "whitespace":
            closers = torch.tensor(WORD_CLOSERS, device=x.device)
            return torch.isin(self._packed_tokens, closers).float(), None
        logits = self.predictor(x).squeeze(-1).float()
        if self.boundary == "gumbel" and self.training and state is None:
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / self.temperature)
            return hard_boundaries(soft) + (soft - soft.detach()), logits
        return (logits > 0).float(), logits

    def _boundaries(self, x, state, layout):
        if self.boundary == "fixed":
            return self._strided(self._positions(state, layout)).view(x.shape[:2]), None
        return self._predict(x, state)

    def _strided(self, pos):
        """The fixed mode's boundaries (1.0 at every ``stride``-th token) of tokens at positions pos."""
        return ((pos + 1) % self.stride == 0).float()

    def _boundary_loss(self, record, logits):
        b, hard, layout = record["b"], record["hard"], record["layout"]
        if self.boundary == "gumbel":
            # Binomial prior on each sequence's boundary count (the count carries the STE gradient).
            n = layout.n
            counts = torch.zeros(n, device=b.device).index_add(0, layout.seq, b.reshape(-1).float())
            lengths = (layout.cu[1:] - layout.cu[:-1]).float()
            prior = torch.distributions.Binomial(lengths, probs=torch.full_like(lengths, self.prior),
                                                 validate_args=False)
            return (-prior.log_prob(counts) / lengths.clamp_min(1)).mean()
        if self.boundary == "entropy":
            if logits is None or logits.shape[:2] != hard.shape:
                raise ValueError(f"boundary='entropy' needs the LM's logits [B, T, V] with [B, T] = "
                                 f"{tuple(hard.shape)} to build its targets")
            target = _entropy_spikes(logits.detach().float())
            return F.binary_cross_entropy_with_logits(record["logits"], target)
        if self.boundary == "hnet":
            # H-Net's ratio loss: N/(N-1) ((N-1) F G + (1-F)(1-G)), minimal at F = G = 1/N.
            N = 1.0 / self.prior
            frac, prob = hard.float().mean(), record["p"].mean()
            return N / (N - 1) * ((N - 1) * frac * prob + (1 - frac) * (1 - prob))
        return hard.new_zeros(())

    def _record(self, state, **values):
        if state is None and torch.is_grad_enabled():
            self._aux = values

    # --- the pooling modes ---------------------------------------------------------------------

    def _mix_pooling(self, x, state, cu_seqlens, layout):
        b, logits = self._boundaries(x, state, layout)
        self._record(state, b=b, hard=hard_boundaries(b.detach()), logits=logits, layout=layout)
        if state is None:
            pooled = segment_pool(x, b, max_segments=self.max_segments, cu_seqlens=cu_seqlens, backend=self.backend)
            null = self.null.to(pooled.dtype).expand(pooled.shape[0], 1, -1)
            h, _ = self._run_inner(self.down_norm(torch.cat([null, pooled], 1)), None, None)
            return segment_upsample(self.up_norm(h), b, cu_seqlens=cu_seqlens, backend=self.backend), None
        return self._stream_pooling(x, b, state, cu_seqlens, layout)

    def cpu_decoding_step(self, like, state):
        """A decoding token as one C++ call (step_cpu.pooling_step, step_cpu.hnet_step) where every inner block is
        an ordinary block of one C++ layer call, else the Python step (:meth:`_pooling_step`, :meth:`_hnet_step`)
        with the inner blocks' C++ steps bound once (:meth:`Block.cpu_decoding_parts`): the calls :meth:`mix` makes
        for a decoding token. A batch of so many rows that the boundary's products would be oneDNN's
        (seqmix.kernels.linear) takes the Python step. The whitespace boundaries read the token ids the step is
        called for (:meth:`observe_tokens`, as :meth:`forward` reads them). Where the one call serves the state's
        batch, the step is a :class:`~seqmix.kernels.step_cpu.ProgramCall`, which an LM's one-call decoder runs
        among its blocks. None while training or where an inner block has no such step. See
        :meth:`Mixer.cpu_decoding_step`."""
        if self.training:
            return None
        parts = self._inner_parts(like, state)
        if parts is None:
            return None
        product = (self.q_proj.weight if self.boundary == "hnet"
                   else self.predictor[0].weight if self.boundary in ("gumbel", "entropy") else None)
        rows = like.new_empty(state["position"].shape[0], self.hidden_size)  # a decoding step's, in this batch
        # Not where the boundary's product at these rows is oneDNN's, whose rounding the C++ call does not share.
        one_call = (all(type(p.call) is step_cpu.LayerCall and p.mlp_norm is not None for p in parts)
                    and (product is None or not onednn_serves(rows, product)))
        program = self._cpu_program(parts) if one_call else None
        inner_steps = None if one_call else [bound_block_step(p) for p in parts]
        python_step = self._hnet_step if self.boundary == "hnet" else self._pooling_step
        whitespace = self.boundary == "whitespace"

        def step(x, state):
            tokens = None
            if whitespace:
                self._packed_tokens = self._call_tokens(x[:, None])
                tokens = self._packed_tokens.view(-1)
            if program is not None:
                return program(x, state, tokens)
            y, state = python_step(x[:, None], state, inner_steps)
            return y[:, 0], state

        return step if program is None else step_cpu.ProgramCall(program, step)

    def _cpu_program(self, parts):
        """The decoding token as one C++ call with the inner blocks ``parts`` (:meth:`cpu_decoding_step`)."""
        up = (self.up_norm.weight, self.up_norm.eps)
        if self.boundary == "hnet":
            return step_cpu.hnet_step(self.q_proj.weight, self.k_proj.weight, self.residual_proj.weight, *up, parts)
        predictor = None if self.boundary in ("fixed", "whitespace") else (
            self.predictor[0].weight, self.predictor[0].bias, self.predictor[2].weight, self.predictor[2].bias)
        closers = WORD_CLOSERS if self.boundary == "whitespace" else ()
        return step_cpu.pooling_step(predictor, self.stride, closers, self.down_norm.weight, self.down_norm.eps, *up,
                                     parts)

    def _inner_parts(self, like, state) -> list | None:
        """The inner blocks' one-token steps in parts for this state (:meth:`Block.cpu_decoding_parts`), or None
        where one has none."""
        parts = []
        for block, block_state in zip(self.inner, self._unflatten(state)):
            parts.append(block.cpu_decoding_parts(like, block_state, {}))
            if parts[-1] is None:
                return None
        return parts

    def _inner_steps(self, like, state) -> list | None:
        """The inner blocks' bound one-token steps for this state, or None where one has none."""
        parts = self._inner_parts(like, state)
        return None if parts is None else [bound_block_step(p) for p in parts]

    def _pooling_step(self, x, state, inner_steps=None):
        """One token per sequence (x [B, 1, D]): the open segment's sum and count take the token; where tokens close
        their segments, the segments' means run through the inner layers' own one-token steps (their bound C++
        steps: ``inner_steps``, or bound here once a segment closes; their module calls where they have none) and
        become what those tokens and the ones after them read. What :meth:`_stream_pooling` computes for such a
        call, without its segment bookkeeping and packed inner call (docs/design.md, "Seventeenth round"). Where
        only some tokens close (a batch), the inner layers run on every row and the rows whose tokens do not close
        keep their inner states (:func:`_rows_where`)."""
        b = self._strided(state["position"])[:, None] if self.boundary == "fixed" else self._predict(x, state)[0]
        closes = hard_boundaries(b)[:, 0].bool()
        inner = self._unflatten(state)
        total, count = state["sum"] + x[:, 0].float(), state["count"] + 1
        new = {"position": state["position"] + 1, "last": state["last"], "sum": total, "count": count}
        if bool(closes.any()):  # host syncs: the inner layers run only when a segment closes
            pooled = (total / count[:, None]).to(x.dtype)[:, None]
            steps = self._inner_steps(x, state) if inner_steps is None else inner_steps
            h, ran = self._run_inner(self.down_norm(pooled), inner, None, steps)
            last = self.up_norm(h)[:, 0].float()
            if bool(closes.all()):
                inner = ran
                new.update(last=last, sum=torch.zeros_like(total), count=torch.zeros_like(count))
            else:
                inner = [_rows_where(closes, r, s) for r, s in zip(ran, inner)]
                rows = closes[:, None]
                new.update(last=torch.where(rows, last, new["last"]), sum=torch.where(rows, 0.0, total),
                           count=torch.where(closes, 0.0, count))
        return new["last"][:, None].to(x.dtype), {**new, **self._flatten(inner)}

    def _stream_pooling(self, x, b, state, cu_seqlens, layout):
        """Continue the sequences of ``state``: the open segment's sum and count join the first segment
        closed here; the new segments (packed) continue the inner layers' states."""
        n, D = layout.n, self.hidden_size
        seg = segments_of(hard_boundaries(b), *b.shape, n, cu_seqlens)
        pooled = segment_pool(x, b, cu_seqlens=cu_seqlens, backend=self.backend).float()  # [n, S, D]
        S = pooled.shape[1]
        sigma = seg.c - hard_boundaries(b).reshape(-1).long()
        closed = torch.zeros(n, dtype=torch.int64, device=x.device).scatter_reduce(0, seg.seq, seg.c, "amax")
        xf = x.reshape(-1, D).float()
        in_first = (sigma == 0).float()
        n_first = torch.zeros(n, device=x.device).index_add(0, seg.seq, in_first)
        if S:
            total = pooled[:, 0] * n_first[:, None] + state["sum"]
            first = total / (n_first + state["count"]).clamp_min(1)[:, None]
            first = torch.where((closed > 0)[:, None], first, pooled[:, 0])
            pooled = torch.cat([first[:, None], pooled[:, 1:]], 1)
        is_open = (sigma == closed[seg.seq]).float()
        kept = (closed == 0).float()
        new_sum = state["sum"] * kept[:, None] + torch.zeros(n, D, device=x.device).index_add(
            0, seg.seq, xf * is_open[:, None])
        new_count = state["count"] * kept + torch.zeros(n, device=x.device).index_add(0, seg.seq, is_open)
        inner = self._unflatten(state)
        rows = torch.arange(S, device=x.device)[None, :] < closed[:, None]  # [n, S] new segments
        y = torch.zeros(n, S + 1, D, device=x.device)
        y[:, 0] = state["last"]
        if S:
            packed = self.down_norm(pooled[rows].to(x.dtype))[None]
            inner_cu = torch.cat([closed.new_zeros(1), closed.cumsum(0)])
            h, inner = self._run_inner(packed, inner, inner_cu)
            y[:, 1:][rows] = self.up_norm(h)[0].float()
        out = segment_upsample(y.to(x.dtype), b, cu_seqlens=cu_seqlens, backend=self.backend)
        last = y[torch.arange(n, device=x.device), closed]
        lengths = layout.cu[1:] - layout.cu[:-1]
        new = {"position": state["position"] + lengths, "last": last, "sum": new_sum, "count": new_count}
        return out, {**new, **self._flatten(inner)}

    # --- H-Net ---------------------------------------------------------------------------------

    def _mix_hnet(self, x, state, cu_seqlens, layout):
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        pos = self._positions(state, layout)
        starts = torch.zeros_like(pos, dtype=torch.bool)
        starts[layout.cu[:-1].clamp_max(flat.shape[0] - 1)] = True
        prev = torch.cat([flat[:1], flat[:-1]])
        if state is not None:
            prev = torch.where(starts[:, None], state["prev"][layout.seq].to(x.dtype), prev)
        p = self._hnet_probabilities(prev, flat, pos)
        hard = (p > 0.5).view(B, T)
        b = hard.float()
        self._record(state, b=b, hard=hard, p=p, layout=layout)
        chunks, chunk_cu = chunk_select(x, b, cu_seqlens=cu_seqlens)
        inner = None if state is None else self._unflatten(state)
        if chunks.shape[1]:
            h, inner = self._run_inner(chunks, inner, chunk_cu)
            z = self.up_norm(h)
        else:
            z = chunks
        p_chunks = p[hard.reshape(-1)][None]
        out, ema = ema_dechunk(z, p_chunks, b, chunk_cu, cu_seqlens=cu_seqlens,
                               initial_state=None if state is None else state["ema"],
                               output_final_state=state is not None, head_dim=self.ema_head_dim, backend=self.backend)
        selected = torch.where(hard.reshape(-1), p, 1 - p)
        out = out * _straight_through_one(selected).view(B, T, 1).to(out.dtype) + self.residual_proj(x)
        if state is None:
            return out, None
        last_index = (layout.cu[1:] - 1).clamp_min(0)
        has_tokens = layout.cu[1:] > layout.cu[:-1]
        new_prev = torch.where(has_tokens[:, None], flat[last_index].float(), state["prev"])
        new = {"position": state["position"] + (layout.cu[1:] - layout.cu[:-1]), "prev": new_prev, "ema": ema.float()}
        return out, {**new, **self._flatten(inner)}

    def _hnet_probabilities(self, prev, h, pos):
        """H-Net's boundary probabilities p [L] (float32) of tokens h [L, D] after prev [L, D] at positions
        pos [L]: (1 - cos(W_q prev, W_k h)) / 2, and 1 at each sequence's first token."""
        cos = F.cosine_similarity(self.q_proj(prev).float(), self.k_proj(h).float(), dim=-1)
        return torch.where(pos == 0, torch.ones_like(cos), ((1 - cos) / 2).clamp(0.0, 1.0))

    def _hnet_step(self, x, state, inner_steps=None):
        """One token per sequence (x [B, 1, D]): a boundary token runs through the inner layers' own one-token steps
        and updates the EMA, e = p z + (1 - p) e (p clamped as :func:`~seqmix.kernels.ema_dechunk` clamps it); every
        token reads e. What :meth:`_mix_hnet` computes for such a call, without chunk selection and the EMA's ``ssd``
        call. Where only some tokens are boundaries (a batch), the inner layers run on every row and the others keep
        their EMA and inner states (:func:`_rows_where`). The inner layers' bound C++ steps ``inner_steps`` as
        :meth:`_pooling_step` takes them."""
        h = x[:, 0]
        p = self._hnet_probabilities(state["prev"].to(x.dtype), h, state["position"])
        hard = p > 0.5
        inner, ema = self._unflatten(state), state["ema"]
        if bool(hard.any()):  # host syncs: the inner layers run only at a boundary
            steps = self._inner_steps(x, state) if inner_steps is None else inner_steps
            z, ran = self._run_inner(h[:, None], inner, None, steps)
            pc = p.clamp(1e-4, 1 - 1e-4)[:, None]
            moved = pc * self.up_norm(z)[:, 0].float() + (1 - pc) * ema
            if bool(hard.all()):
                inner, ema = ran, moved
            else:
                inner = [_rows_where(hard, r, s) for r, s in zip(ran, inner)]
                ema = torch.where(hard[:, None], moved, ema)
        selected = torch.where(hard, p, 1 - p)
        out = ema.to(x.dtype) * _straight_through_one(selected)[:, None].to(x.dtype) + self.residual_proj(h)
        new = {"position": state["position"] + 1, "prev": h.float(), "ema": ema.float()}
        return out[:, None], {**new, **self._flatten(inner)}

    # --- the inner stack -----------------------------------------------------------------------

    def _run_inner(self, h, states, cu_seqlens, steps=None):
        """The inner blocks on h [B, T, D] with their states (None: a training call); one token through their
        bound steps ``steps`` where given (the same calls, without the modules)."""
        if steps is not None:
            B, _, D = h.shape
            h, new_states = h.view(B, D), []
            for step, s in zip(steps, states, strict=True):
                h, s = step(h, s)
                new_states.append(s)
            return h.view(B, 1, D), new_states
        new_states = []
        for j, block in enumerate(self.inner):
            h, s = block(h, None if states is None else states[j], cu_seqlens, None)
            new_states.append(s)
        return h, (None if states is None else new_states)

    def _flatten(self, inner) -> State:
        return {f"inner.{j}.{k}": v for j, s in enumerate(inner) for k, v in s.items()}

    def _unflatten(self, state: State) -> list[State]:
        parts = [{} for _ in self.inner]
        for key, value in state.items():
            if key.startswith("inner."):
                _, j, name = key.split(".", 2)
                parts[int(j)][name] = value
        return parts


def _entropy_spikes(logits: torch.Tensor) -> torch.Tensor:
    """1 where the next-byte entropy at t exceeds the entropy at each of the SPIKE_WINDOW tokens before t."""
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    spikes = torch.ones_like(entropy, dtype=torch.bool)
    for i in range(1, SPIKE_WINDOW + 1):
        spikes[:, i:] &= entropy[:, i:] > entropy[:, :-i]
    return spikes.float()
