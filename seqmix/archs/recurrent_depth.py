"""Recurrent depth (Geiping et al. 2025, the Huginn model): a core of blocks iterated r times on a latent.

The LM's blocks before this layer are the prelude P and those after it the coda C. The layer reads
the prelude's normalised stream as the embedded input e, starts a latent s_0 from noise, iterates
``s_i = R(A([s_{i-1}; e]))`` r times and returns s_r, which replaces the LM's residual stream
(:attr:`RecurrentDepth.replaces_stream`), so the coda sees s_r. R is a list of registered mixers,
each with its MLP, in sandwich blocks (a norm before and after each sublayer). See docs/design.md,
"Recurrent depth", for what was chosen and why.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.archs.lm import SwiGLU, default_intermediate_size
from seqmix.archs.mixer import (
    MIXERS,
    Mixer,
    State,
    build_mixer,
    init_mixer_state,
    register_mixer,
    take_step,
    with_parent_backend,
)
from seqmix.archs.modules import Linear, no_weight_decay
from seqmix.kernels import add_rms_norm, add_rms_norm_backend, step_cpu
from seqmix.kernels.linear import linear

# The latent's noise is a normal truncated at +-3 standard deviations, as in the paper.
TRUNCATION = 3.0
# sigma of the log-normal rate of the training depth distribution (the paper's value).
RATE_SIGMA = 0.5
STATE_MODES = ("exact", "bounded")
EXIT_CRITERIA = ("kl", "latent")

_MASK32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash held in int64 (multipliers below 2^31, so no product overflows)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & _MASK32
    return h ^ (h >> 16)


def positional_noise(positions: torch.Tensor, hidden_size: int, std: float, seed: int, dtype) -> torch.Tensor:
    """Truncated-normal noise [*positions.shape, hidden_size] that is a function of (seed, position, channel).

    A token gets the same start latent in a full call, in a prefill in pieces and in one-token
    decoding, which is what makes the decoding state exact. A counter hash gives a 24-bit uniform u,
    mapped into [Phi(-3), Phi(3)] and through the normal's inverse CDF.
    """
    channel = torch.arange(hidden_size, device=positions.device, dtype=torch.int64)
    index = positions.to(torch.int64)[..., None] * hidden_size + channel
    key = _mix32(seed & _MASK32)  # a Python int: no tensor made on the host, nothing copied to the device
    h = _mix32((index & _MASK32) ^ _mix32((index >> 32) ^ key))
    return _truncated_normal(((h >> 8).to(torch.float32) + 0.5) / 2**24, std, dtype)


def _truncated_normal(u: torch.Tensor, std: float, dtype) -> torch.Tensor:
    """The normal (std ``std``) truncated at +-TRUNCATION standard deviations, from uniforms u in (0, 1):
    u mapped into [Phi(-3), Phi(3)] and through the normal's inverse CDF. No rejection loop, so no host
    sync and nothing data-dependent for torch.compile (``nn.init.trunc_normal_`` loops until no sample
    is rejected)."""
    lo = 0.5 * math.erfc(TRUNCATION / math.sqrt(2))  # Phi(-3)
    z = math.sqrt(2) * torch.erfinv(2 * (lo + u * (1 - 2 * lo)) - 1)
    return (z * std).to(dtype)


def sample_depth(mean_steps: int, backprop_steps: int, generator: torch.Generator) -> tuple[int, int]:
    """The paper's training depth: r = Poisson(lambda) + 1 with lambda log-normal (sigma 0.5), scaled
    so that E[r] = ``mean_steps``; k = min(backprop_steps, r). Returns (r, k)."""
    if mean_steps == 1:
        return 1, 1
    mu = math.log(mean_steps - 1) - RATE_SIGMA**2 / 2  # E[lambda] = exp(mu + sigma^2 / 2) = mean_steps - 1
    rate = torch.empty(1).log_normal_(mu, RATE_SIGMA, generator=generator)
    r = int(torch.poisson(rate, generator=generator).item()) + 1
    return r, min(backprop_steps, r)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class SandwichBlock(nn.Module):
    """``s = n2(s + mixer(n1(s)))``, then ``s = n4(s + mlp(n3(s)))``: the paper's block, a norm before and
    after each sublayer. The add and the norm after a sublayer are one :func:`add_rms_norm`."""

    def __init__(self, mixer: Mixer, hidden_size: int, intermediate_size: int, eps: float):
        super().__init__()
        self.mixer = mixer
        self.mlp = SwiGLU(hidden_size, intermediate_size)
        self.eps = eps
        for name in ("norm_mixer_in", "norm_mixer_out", "norm_mlp_in", "norm_mlp_out"):
            weight = nn.Parameter(torch.ones(hidden_size))
            no_weight_decay(weight)
            self.register_parameter(name, weight)

    def forward(self, s, state, cu_seqlens, norm_backend: str):
        """``norm_backend``: add_rms_norm's backend, resolved once per layer call by the caller. A decoding step
        on the norms' ``cpu`` backend takes everything after the mixer in one C++ call
        (step_cpu.sandwich_swiglu_step)."""
        def norm(x, residual, weight):
            return add_rms_norm(x, residual, weight, self.eps, backend=norm_backend)[0]

        params = self._parameters
        y, state = self.mixer(norm(s, None, params["norm_mixer_in"]), state, cu_seqlens=cu_seqlens)
        if norm_backend == "cpu" and state is not None and s.shape[1] == 1 and not torch.is_grad_enabled():
            mlp = self._modules["mlp"]._modules
            weights = (params["norm_mixer_out"], params["norm_mlp_in"], params["norm_mlp_out"],
                       mlp["gate_up"]._parameters["weight"], mlp["down"]._parameters["weight"])
            if step_cpu.serves_step("sandwich_swiglu_step", s, y, *weights):
                return step_cpu.sandwich_swiglu_step(s, y, *weights[:3], self.eps, *weights[3:]), state
        s = norm(y, s, params["norm_mixer_out"])
        return norm(self.mlp(norm(s, None, params["norm_mlp_in"])), s, params["norm_mlp_out"]), state

    def cpu_decoding_parts(self, like, state) -> step_cpu.CoreBlock | None:
        """The block's one-token step in parts bound to its weights as they are now: the first norm's weight, the
        mixer's :meth:`Mixer.cpu_decoding_step` (``call``), and the rest's weights (step_cpu.sandwich_swiglu_step);
        the calls :meth:`forward` makes for a decoding step on the norms' ``cpu`` backend. None where the mixer has
        no such step or the C++ steps do not serve ``like``."""
        params, mlp = self._parameters, self._modules["mlp"]._modules
        weights = (params["norm_mixer_in"], params["norm_mixer_out"], params["norm_mlp_in"], params["norm_mlp_out"])
        matrices = (mlp["gate_up"]._parameters["weight"], mlp["down"]._parameters["weight"])
        mixer_step = self._modules["mixer"].cpu_decoding_step(like, state)
        if mixer_step is None or not step_cpu.serves_step("sandwich_swiglu_step", like, *weights, *matrices):
            return None
        return step_cpu.CoreBlock(mixer_step, *weights, self.eps, *matrices)


def _bound_core_block_step(parts: step_cpu.CoreBlock):
    """A core block's decoding step from its parts: ``s, state = step(s, state)``, s [B, hidden]."""
    mixer_step, norm_weight, eps = parts.call, parts.norm_in, parts.eps
    row_norm = step_cpu.row_norm.bind(norm_weight)
    rest = (parts.mixer_out, parts.mlp_in, parts.mlp_out, eps, parts.gate_up, parts.down)
    sandwich_swiglu_step = step_cpu.sandwich_swiglu_step.bind(*rest[:3], *rest[4:])

    def step(s, state):
        y, state = mixer_step(row_norm(s, norm_weight, None, eps, True), state)
        return sandwich_swiglu_step(s, y, *rest), state

    return step


@register_mixer("recurrent_depth")
class RecurrentDepth(Mixer):
    """A core of sandwich blocks iterated r times on a latent s that re-reads the input e each step.

    ``s_0`` is noise, ``s_i = R(W_s s_{i-1} + W_e e)`` (the adapter on ``[s; e]``, split so that
    ``W_e e`` is computed once per call), and the output is ``s_r``. Besides the Mixer call, ``mix``
    (and so the layer's call) takes:

    - ``num_steps``: r (default ``mean_steps``; in the exact mode with a state, the state's r);
    - ``backprop_steps``: k; with gradients enabled the first r - k iterations run under ``no_grad``
      (default the layer's ``backprop_steps``, capped at r);
    - ``exit_threshold``: per-token adaptive exit: a token stops changing once its criterion falls
      below the threshold (``exit_criterion="kl"``: KL(p_i || p_{i-1}) of ``readout(s)``'s
      predictions, which the LM passes; ``"latent"``: ||s_i - s_{i-1}|| / ||s_i||); never more than
      r iterations, and threshold 0 is fixed-r. The iterations each token used are left in
      :attr:`last_exit_steps` ([B, T], or [1, L] packed).
    - ``initial_latent``: s_0 [B, T, hidden] instead of the noise.

    The decoding state: ``length`` [N] (tokens seen: the noise of a token is a function of its
    position), the core mixers' states, and with ``warm_start`` the last token's final latent
    ``latent`` [N, hidden]. ``state_mode="exact"`` keeps one state per iteration and core block
    (keys ``"{i}.{j}.{name}"``; r is fixed by :meth:`init_state`), so pieces and one-token decoding
    equal one call; ``"bounded"`` keeps one per core block (``"{j}.{name}"``) whatever r: every
    iteration of a call continues the state the previous call left and the last iteration's state is
    kept, so a past token is seen as its final iteration left it (approximate by design, memory
    independent of r).

    Args:
        hidden_size: model width.
        num_heads: passed to the core mixers that take it.
        core: names of registered mixers, one sandwich block each (default four attention blocks).
        core_options: per core mixer name, extra constructor arguments.
        mean_steps: E[r] of the training distribution, and the default r.
        backprop_steps: k, the iterations that get gradients.
        init_std: standard deviation of s_0's truncated-normal noise (default sqrt(2 / (5 hidden)), the
            paper's); 0 starts from zeros.
        noise_seed: seed of the positional noise (every call except training calls without a state,
            which draw i.i.d. noise from torch's generator).
        state_mode: ``"exact"`` or ``"bounded"``.
        warm_start: a decoded token starts from the previous token's final latent instead of noise
            (the first token of each sequence in a call; a prefill's other tokens start from noise).
        intermediate_size: the core MLPs' width (default 8/3 hidden rounded up to 64).
        norm_eps: epsilon of the sandwich norms.
        backend: ``"reference"`` (the oracle: concatenated adapter every iteration, reference norms,
            core mixers on their reference backend), ``"triton"`` (fused norms; core mixers on their
            Triton backend where they have one) or None (automatic).
    """

    backends = ("reference", "triton")
    #: the LM block puts this layer's output in place of its residual stream and adds no MLP (the core has them).
    replaces_stream = True
    #: the LM passes num_steps, backprop_steps, exit_threshold and readout to this layer.
    takes_steps = True

    def __init__(self, hidden_size: int, num_heads: int = 4, core: list[str] | None = None,
                 core_options: dict[str, dict] | None = None, mean_steps: int = 32, backprop_steps: int = 8,
                 init_std: float | None = None, noise_seed: int = 0, state_mode: str = "exact",
                 warm_start: bool = False, intermediate_size: int | None = None, norm_eps: float = 1e-5,
                 backend: str | None = None):
        super().__init__()
        core = ["attention"] * 4 if core is None else core
        core_options = core_options or {}
        self._check_core(core, core_options)
        self.mean_steps = _positive_int("mean_steps", mean_steps)
        self.backprop_steps = _positive_int("backprop_steps", backprop_steps)
        if init_std is None:
            init_std = math.sqrt(2 / (5 * hidden_size))
        if not isinstance(init_std, (int, float)) or not math.isfinite(init_std) or init_std < 0:
            raise ValueError(f"init_std must be a finite number >= 0, got {init_std!r}")
        if state_mode not in STATE_MODES:
            raise ValueError(f"state_mode must be one of {STATE_MODES}, got {state_mode!r}")
        if backend not in (None, *self.backends):
            raise ValueError(f"backend must be None or one of {self.backends}, got {backend!r}")
        self.hidden_size, self.init_std, self.noise_seed = hidden_size, float(init_std), int(noise_seed)
        self.state_mode, self.warm_start, self.backend = state_mode, bool(warm_start), backend
        if intermediate_size is None:
            intermediate_size = default_intermediate_size(hidden_size)
        self.adapter = Linear(2 * hidden_size, hidden_size, bias=False)
        self.core = nn.ModuleList(
            SandwichBlock(self._core_mixer(name, hidden_size, num_heads, core_options.get(name, {})),
                          hidden_size, intermediate_size, norm_eps)
            for name in core
        )
        self.last_exit_steps: torch.Tensor | None = None
        self._init_weights()

    @staticmethod
    def _check_core(core, core_options):
        if isinstance(core, str) or not isinstance(core, (list, tuple)) or not core:
            raise ValueError(f"core must be a non-empty list of registered mixer names, got {core!r}")
        for name in core:
            if not isinstance(name, str) or name not in MIXERS:
                raise ValueError(f"core: {name!r} is not a registered mixer; registered: {sorted(MIXERS)}")
            if MIXERS[name] is RecurrentDepth:
                raise ValueError("core: a recurrent_depth layer cannot iterate another recurrent_depth layer")
        unused = sorted(set(core_options) - set(core))
        if unused:
            raise ValueError(f"core_options names mixer(s) {unused} that the core does not use")

    def _core_mixer(self, name, hidden_size, num_heads, options):
        kwargs = {"hidden_size": hidden_size}
        if "num_heads" in inspect.signature(MIXERS[name]).parameters:
            kwargs["num_heads"] = num_heads
        return build_mixer(name, **kwargs, **with_parent_backend(name, self.backend, options))

    def _init_weights(self):
        # The paper's small init, std sqrt(2 / (5 hidden)), and the MLP projections that write into the latent
        # scaled down by the unrolled depth; the core mixers keep their own initialisation.
        std = math.sqrt(2 / (5 * self.hidden_size))
        nn.init.normal_(self.adapter.weight, std=std)
        for block in self.core:
            nn.init.normal_(block.mlp.gate_up.weight, std=std)
            nn.init.normal_(block.mlp.down.weight, std=std / math.sqrt(2 * len(self.core) * self.mean_steps))

    def sample_steps(self, generator: torch.Generator) -> tuple[int, int]:
        """A training depth (r, k) from the paper's distribution (see :func:`sample_depth`)."""
        return sample_depth(self.mean_steps, self.backprop_steps, generator)

    # --- the decoding state ---------------------------------------------------------------------

    def init_state(self, batch_size: int, num_steps: int | None = None, capacity: int = 0) -> State:
        """The empty state; in the exact mode it holds ``num_steps`` (default ``mean_steps``) iterations.
        ``capacity`` goes to the core mixers that preallocate (attention: in-place decoding, see
        :class:`~seqmix.archs.Attention`)."""
        device = self.adapter.weight.device
        state = {"length": torch.zeros(batch_size, dtype=torch.int64, device=device)}
        if self.warm_start:
            state["latent"] = torch.zeros(batch_size, self.hidden_size, device=device, dtype=self.adapter.weight.dtype)
        r = _positive_int("num_steps", self.mean_steps if num_steps is None else num_steps)
        prefixes = [f"{i}." for i in range(r)] if self.state_mode == "exact" else [""]
        for prefix in prefixes:
            for j, block in enumerate(self.core):
                for name, value in init_mixer_state(block.mixer, batch_size, capacity=capacity).items():
                    state[f"{prefix}{j}.{name}"] = value
        return state

    def sequence_state(self, state: State, i: int) -> State:
        out = {name: state[name][i] for name in ("length", "latent") if name in state}
        groups = self._core_states(state)
        for prefix in self._prefixes(state):
            for j, block in enumerate(self.core):
                part = block.mixer.sequence_state(groups.get(f"{prefix}{j}", {}), i)
                out.update({f"{prefix}{j}.{name}": value for name, value in part.items()})
        return out

    def _prefixes(self, state: State) -> list[str]:
        if self.state_mode == "bounded":
            return [""]
        return [f"{i}." for i in range(self._stored_steps(state))]

    @staticmethod
    def _stored_steps(state: State) -> int:
        return len({name.split(".", 1)[0] for name in state if name.count(".") >= 2})

    @staticmethod
    def _core_states(state: State) -> dict[str, State]:
        """The core blocks' states by the head of their keys (``"{i}.{j}"`` in the exact mode, ``"{j}"`` bounded):
        one pass over the state, where a scan of it per block and iteration took r x blocks passes (6.0 ms a
        layer's decoding step at r = 32 and 4 blocks, 513 keys; now 0.22)."""
        groups = {}
        for name, value in state.items():
            head, _, leaf = name.rpartition(".")
            groups.setdefault(head, {})[leaf] = value
        return groups

    # --- the call -------------------------------------------------------------------------------

    def mix(self, x, state: State | None, *, cu_seqlens=None, num_steps=None, backprop_steps=None,
            exit_threshold=None, exit_criterion="kl", readout=None, initial_latent=None):
        if (state is not None and x.shape[1] == 1 and cu_seqlens is None and initial_latent is None
                and not torch.is_grad_enabled()):
            step = self.cpu_decoding_step(x, state, num_steps=num_steps, backprop_steps=backprop_steps,
                                          exit_threshold=exit_threshold)
            if step is not None:
                return take_step(step, x, state)
        r, k = self._depth(state, num_steps, backprop_steps)
        exit_on = self._check_exit(exit_threshold, exit_criterion, readout)
        seq, offset, lengths = self._layout(x, cu_seqlens)
        past = self._past(state, lengths.shape[0])
        e_in = x if self.backend == "reference" else linear(x, self.adapter.weight[:, self.hidden_size:])
        s = self._start(x, state, seq, offset, past, initial_latent)
        layer_states = self._layer_states(state, r)
        norm_backend = add_rms_norm_backend(x, self.backend)
        grad = torch.is_grad_enabled()
        done = steps = prev = None
        if exit_on:
            done = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
            steps = torch.full(x.shape[:2], r, dtype=torch.int64, device=x.device)
        new_layer_states = []
        for i in range(r):
            with torch.set_grad_enabled(grad and i >= r - k):
                s_next, out_states = self._iterate(s, e_in, layer_states[i], cu_seqlens, norm_backend)
            new_layer_states.append(out_states)
            if exit_on:
                s_next, prev = self._exit(i, s, s_next, prev, done, steps, exit_threshold, exit_criterion, readout)
            s = s_next
            # Stop when every token has exited, unless exact states must still be written for the later
            # iterations. One host sync per iteration: adaptive exit trades it for the iterations it saves.
            if exit_on and (state is None or self.state_mode == "bounded") and i < r - 1 and bool(done.all()):
                break
        if exit_on:
            self.last_exit_steps = steps
        if state is None:
            return s, None
        return s, self._new_state(state, s, past, lengths, cu_seqlens, self._core_state(new_layer_states))

    def cpu_decoding_step(self, like, state, num_steps=None, backprop_steps=None, exit_threshold=None,
                          readout=None, head=None):
        """One token's r iterations with the core blocks' C++ steps bound once
        (:meth:`SandwichBlock.cpu_decoding_parts`) and the latent's start and the adapter as :meth:`mix` computes
        them, so the outputs and states equal its (tests/archs/test_recurrent_depth.py). Where every core mixer's step
        is one C++ call (a :class:`~seqmix.kernels.step_cpu.LayerCall`) the r iterations are one C++ call
        (step_cpu.recurrent_core), the adaptive exit included when ``head`` gives its readout's weights (the LM's
        final norm weight, eps and head: ``readout`` as the C++ call computes it); else the blocks' bound steps,
        without the exit. ``num_steps``, ``backprop_steps`` and ``exit_threshold`` as :meth:`mix` takes and checks
        them (``backprop_steps`` changes nothing without autograd). None with the exit but no ``head`` (or no single
        call), the reference backend, norms off the ``cpu`` backend, or a core mixer without such a step. See
        :meth:`Mixer.cpu_decoding_step`."""
        if self.backend == "reference" or add_rms_norm_backend(like, self.backend) != "cpu":
            return None
        if exit_threshold is not None and head is None:
            return None
        r, _ = self._depth(state, num_steps, backprop_steps)
        exits = self._check_exit(exit_threshold, "kl", readout)
        blocks = []
        for block, block_state in zip(self.core, self._layer_states(state, r)[0], strict=True):
            blocks.append(block.cpu_decoding_parts(like, block_state))
            if blocks[-1] is None:  # before the next block's choices are recorded (seqmix.kernels.explain)
                return None
        H = self.hidden_size
        if all(type(parts.call) is step_cpu.LayerCall for parts in blocks):
            bounded = self.state_mode == "bounded"
            prefixes = [""] * r if bounded else [f"{i}." for i in range(r)]
            iterate = step_cpu.recurrent_core(self.adapter.weight[:, :H], blocks, prefixes, bounded,
                                              (exit_threshold, *head) if exits else None)
        elif exits:
            return None
        else:
            iterate = self._bound_iterations(r, [_bound_core_block_step(parts) for parts in blocks])

        def step(x, state):
            x = x.view(-1, 1, H)  # the shapes mix's calls have, so the adapter's products round as they do there
            seq, offset, lengths = self._layout(x, None)
            past = self._past(state, x.shape[0])
            e_in = linear(x, self.adapter.weight[:, H:])
            s = self._start(x, state, seq, offset, past, None)
            s, core_state, steps = iterate(s.view(-1, H), e_in.view(-1, H), state)
            if exits:
                self.last_exit_steps = steps.view(-1, 1)
            return s, self._new_state(state, s.view(x.shape), past, lengths, None, core_state)

        return step

    def _bound_iterations(self, r, block_steps):
        """:func:`step_cpu.recurrent_core`'s ``core`` from the core blocks' bound steps."""
        def iterate(s, e_in, state):
            per_iteration = []
            for block_states in self._layer_states(state, r):
                h = self._adapt(s, e_in)
                new_states = []
                for block_step, block_state in zip(block_steps, block_states):
                    h, block_state = block_step(h, block_state)
                    new_states.append(block_state)
                per_iteration.append(new_states)
                s = h
            return s, self._core_state(per_iteration), None

        return iterate

    def _adapt(self, s, e_in):
        if self.backend == "reference":
            return linear(torch.cat([s, e_in], -1), self.adapter.weight)
        w_s = self.adapter.weight[:, : self.hidden_size]
        # W_s s + (W_e e): one GEMM with the precomputed W_e e added in its epilogue.
        return torch.addmm(e_in.reshape(-1, self.hidden_size), s.reshape(-1, self.hidden_size), w_s.t()).view(s.shape)

    def _iterate(self, s, e_in, states, cu_seqlens, norm_backend):
        h = self._adapt(s, e_in)
        out_states = []
        for block, block_state in zip(self.core, states, strict=True):
            h, block_state = block(h, block_state, cu_seqlens, norm_backend)
            out_states.append(block_state)
        return h, out_states

    def _depth(self, state, num_steps, backprop_steps) -> tuple[int, int]:
        stored = None if state is None or self.state_mode == "bounded" else self._stored_steps(state)
        r = (stored or self.mean_steps) if num_steps is None else _positive_int("num_steps", num_steps)
        if stored is not None and r != stored:
            raise ValueError(f"num_steps={r}, but the state holds {stored} iterations "
                             f"(make it with init_state(batch_size, num_steps={r}))")
        k = self.backprop_steps if backprop_steps is None else _positive_int("backprop_steps", backprop_steps)
        return r, min(k, r)

    @staticmethod
    def _check_exit(threshold, criterion, readout) -> bool:
        if threshold is None:
            return False
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"exit_threshold must be a finite number >= 0, got {threshold!r}")
        if criterion not in EXIT_CRITERIA:
            raise ValueError(f"exit_criterion must be one of {EXIT_CRITERIA}, got {criterion!r}")
        if criterion == "kl" and readout is None:
            raise ValueError("exit_criterion='kl' needs readout (latent -> logits), which the LM passes")
        return True

    @staticmethod
    def _exit(i, s, s_next, prev, done, steps, threshold, criterion, readout):
        """Freeze the tokens whose criterion fell below the threshold at iteration i (done and steps in place);
        returns the latent and this iteration's log-probabilities (for the KL criterion)."""
        s_next = torch.where(done[..., None], s, s_next)
        cur = F.log_softmax(readout(s_next).float(), -1) if criterion == "kl" else None
        if i > 0:
            if criterion == "kl":
                crit = (cur.exp() * (cur - prev)).sum(-1).clamp_min(0)  # rounding can make a KL of ~0 negative
            else:
                crit = (s_next - s).float().norm(dim=-1) / s_next.float().norm(dim=-1).clamp_min(1e-30)
            newly = ~done & (crit < threshold)
            steps.masked_fill_(newly, i + 1)
            done |= newly
        return s_next, cur

    def _layout(self, x, cu_seqlens):
        """Each token's sequence and offset in it ([B, T] or [1, L]) and the sequences' lengths [N]."""
        B, T, _ = x.shape
        if cu_seqlens is None:
            seq = torch.arange(B, device=x.device)[:, None].expand(B, T)
            offset = torch.arange(T, device=x.device)[None, :].expand(B, T)
            return seq, offset, torch.full((B,), T, dtype=torch.int64, device=x.device)
        cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
        index = torch.arange(T, device=x.device)
        seq = torch.searchsorted(cu[1:], index, right=True)
        return seq[None], (index - cu[seq])[None], cu.diff()

    @staticmethod
    def _past(state, n):
        if state is None:
            return None
        past = state.get("length")
        if not isinstance(past, torch.Tensor) or past.shape != (n,):
            got = tuple(past.shape) if isinstance(past, torch.Tensor) else past
            raise ValueError(f"state['length'] must have shape [{n}] (one entry per sequence), got {got}")
        return past

    def _start(self, x, state, seq, offset, past, initial_latent):
        if initial_latent is not None:
            if not isinstance(initial_latent, torch.Tensor) or initial_latent.shape != x.shape:
                got = tuple(initial_latent.shape) if isinstance(initial_latent, torch.Tensor) else initial_latent
                raise ValueError(f"initial_latent must have x's shape {tuple(x.shape)}, got {got}")
            return initial_latent
        if self.init_std == 0:
            s = torch.zeros_like(x)
        elif self.training and state is None:
            s = _truncated_normal(torch.rand_like(x, dtype=torch.float32), self.init_std, x.dtype)
        else:
            positions = offset if past is None else offset + past[seq]
            s = positional_noise(positions, self.hidden_size, self.init_std, self.noise_seed, x.dtype)
        if self.warm_start and state is not None:
            follows = (offset == 0) & (past[seq] > 0)
            s = torch.where(follows[..., None], state["latent"][seq].to(s.dtype), s)
        return s

    def _layer_states(self, state, r):
        """Per iteration, the core blocks' states to continue (None without a state)."""
        if state is None:
            return [[None] * len(self.core)] * r
        groups = self._core_states(state)
        if self.state_mode == "bounded":
            return [[groups.get(f"{j}", {}) for j in range(len(self.core))]] * r
        return [[groups.get(f"{i}.{j}", {}) for j in range(len(self.core))] for i in range(r)]

    def _core_state(self, per_iteration) -> State:
        """The core blocks' states under their keys in the layer's state, from each iteration's (the last one's in the
        bounded mode)."""
        kept = per_iteration[-1:] if self.state_mode == "bounded" else per_iteration
        prefixes = [""] if self.state_mode == "bounded" else [f"{i}." for i in range(len(per_iteration))]
        core = {}
        for prefix, block_states in zip(prefixes, kept, strict=True):
            for j, block_state in enumerate(block_states):
                core.update({f"{prefix}{j}.{name}": value for name, value in block_state.items()})
        return core

    def _new_state(self, state, s, past, lengths, cu_seqlens, core_state: State) -> State:
        new = {"length": past + lengths}
        if self.warm_start:
            last = (s[:, -1] if cu_seqlens is None else s[0, (torch.cumsum(lengths, 0) - 1).clamp_min(0)])
            new["latent"] = torch.where((lengths > 0)[:, None], last.to(state["latent"].dtype), state["latent"])
        return new | core_state
