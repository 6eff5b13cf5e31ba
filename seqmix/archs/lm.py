"""A small decoder-only language model whose layers take any registered mixer.

Embedding, N blocks of (pre-norm mixer + pre-norm SwiGLU MLP, residuals), a final
norm and a head tied to the embedding. ``layers`` names each block's mixer, so a
hybrid is one config line: ``layers=["deltanet", "deltanet", "deltanet", "attention"]``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from seqmix.archs.mixer import MIXERS, DecodingStep, Mixer, State, build_mixer, init_mixer_state
from seqmix.archs.modules import Linear, RMSNorm
from seqmix.kernels import step_cpu, swiglu
from seqmix.kernels.checks import check_values
from seqmix.kernels.linear import linear
from seqmix.kernels.sampling import token_sampler
from seqmix.kernels.sequences import in_dtype

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
MODEL_TYPE = "seqmix"  # config.json's model_type, the name transformers' Auto classes know seqmix by


@dataclass
class LMConfig:
    """The model's shape. ``layers`` entries are mixer names, ``"name*n"`` repeats one n times; a string is a
    comma-separated list of them (``"deltanet*3,attention"``).

    ``mixer_options`` maps a mixer name to extra keyword arguments of its constructor;
    every mixer gets ``hidden_size``, and ``num_heads`` when its constructor takes it.
    Each field's ``metadata["help"]`` describes it (the trainer's ``--help`` shows them).
    """

    vocab_size: int = field(default=320, metadata={"help": "rows of the embedding and the tied head: at least the "
                                                           "259 byte-level tokens (320 is a multiple of 64)"})
    hidden_size: int = field(default=256, metadata={"help": "model width"})
    layers: list[str] = field(default_factory=lambda: ["deltanet"] * 4, metadata={
        "help": "each block's mixer: a name, name*n for n blocks, a comma list (deltanet*3,attention) or a YAML "
                "list ([deltanet*3, attention])"})
    num_heads: int = field(default=4, metadata={"help": "heads, for the mixers whose constructor takes num_heads"})
    intermediate_size: int | None = field(default=None, metadata={
        "help": "SwiGLU width; null: 8/3 of hidden_size rounded up to a multiple of 64"})
    norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon"})
    init_std: float = field(default=0.02, metadata={"help": "std of the embedding's and the MLPs' initial weights"})
    mixer_options: dict[str, dict] = field(default_factory=dict, metadata={
        "help": "extra constructor arguments per mixer name, e.g. \"{mamba: {d_state: 8}}\" (the names each "
                "mixer takes are listed below)"})

    def __post_init__(self):
        layers = self.layers
        if isinstance(layers, str):
            layers = [entry for entry in layers.split(",") if entry.strip()]
        if not isinstance(layers, (list, tuple)) or not all(isinstance(entry, str) for entry in layers):
            raise ValueError(f"layers must be a mixer name, a comma-separated list or a list of names, got {layers!r}")
        expanded = []
        for entry in layers:
            name, _, count = entry.partition("*")
            if count and not count.strip().isdigit():
                raise ValueError(f"layers: {entry!r} must be a mixer name or 'name*count'")
            expanded += [name.strip()] * (int(count) if count else 1)
        self.layers = expanded
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.hidden_size)

    def validate(self, min_vocab: int = 1) -> None:
        """Raise ValueError for a config that cannot build, before anything is built or trained."""
        if not self.layers:
            raise ValueError("layers is empty: the model needs at least one layer")
        unknown = sorted({n for n in self.layers if n not in MIXERS})
        if unknown:
            raise ValueError(f"layers: unknown mixer name(s) {unknown}; registered: {sorted(MIXERS)}")
        if not isinstance(self.mixer_options, dict):
            raise ValueError(f"mixer_options must map mixer names to their options, got {self.mixer_options!r}")
        unused = sorted(set(self.mixer_options) - set(self.layers))
        if unused:
            raise ValueError(f"mixer_options names mixer(s) {unused} that no layer uses")
        for name, options in self.mixer_options.items():
            check_mixer_options(name, options)
        for name, value in (("hidden_size", self.hidden_size), ("num_heads", self.num_heads),
                            ("intermediate_size", self.intermediate_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.vocab_size < min_vocab:
            raise ValueError(f"vocab_size={self.vocab_size} is smaller than the tokenizer's {min_vocab} tokens")
        for name, value, positive in (("norm_eps", self.norm_eps, True), ("init_std", self.init_std, False)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or value < 0 or (positive and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

    def mixer_kwargs(self, name: str) -> dict:
        kwargs = {"hidden_size": self.hidden_size}
        if "num_heads" in inspect.signature(MIXERS[name]).parameters:
            kwargs["num_heads"] = self.num_heads
        return {**kwargs, **self.mixer_options.get(name, {})}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def mixer_option_names(name: str) -> list[str]:
    """The constructor arguments of mixer ``name`` that ``mixer_options`` may set: all but hidden_size, which
    the model sets."""
    return [p for p in inspect.signature(MIXERS[name]).parameters if p != "hidden_size"]


def check_mixer_options(name: str, options) -> None:
    """Raise ValueError unless ``options`` is a mapping of constructor arguments that mixer ``name`` takes."""
    if not isinstance(options, dict):
        raise ValueError(f"mixer_options[{name!r}] must be a mapping of constructor arguments, got {options!r}")
    valid = mixer_option_names(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"mixer_options[{name!r}]: {MIXERS[name].__name__} takes no option(s) {unknown}; "
                         f"its options are {valid}")


def default_intermediate_size(hidden_size: int) -> int:
    """The SwiGLU width when none is given: 8/3 of the hidden size, rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * hidden_size / 3 / 64)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up stored as one weight ``gate_up`` (its halves)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        # One matmul per half of the weight: each output contiguous, so SiLU and its backward run on contiguous
        # rows and the backward needs no concatenation of [*, 2 I] (18-28% off the MLP's fwd+bwd on the CPU at
        # the tiny config's shapes, docs/design.md).
        gate, up = (linear(x, w) for w in self.gate_up.weight.chunk(2))
        return self.down(swiglu(gate, up))


class Block(nn.Module):
    """Pre-norm mixer and MLP with residuals. A mixer with ``replaces_stream`` (recurrent_depth) gets the
    normed stream and its output becomes the stream, with no MLP here: the coda after it sees its final latent."""

    def __init__(self, config: LMConfig, mixer_name: str):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mixer = build_mixer(mixer_name, **config.mixer_kwargs(mixer_name))
        self.replaces_stream = getattr(self.mixer, "replaces_stream", False)
        self.takes_steps = getattr(self.mixer, "takes_steps", False)
        if not self.replaces_stream:
            self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, state, cu_seqlens, attention_mask, **options):
        # Submodules and parameters from their dicts: Module.__getattr__ costs ~0.6 us a look-up, and a decoding
        # step makes a dozen here (11 -> ~5 us a block).
        modules = self._modules
        y, state = modules["mixer"](modules["mixer_norm"](x), state, cu_seqlens=cu_seqlens,
                                    attention_mask=attention_mask, **options)
        if self.replaces_stream:
            return y, state
        mlp, norm = modules["mlp"], modules["mlp_norm"]
        if state is not None and x.shape[1] == 1 and not torch.is_grad_enabled():  # decoding
            weights = (norm._parameters["weight"], mlp._modules["gate_up"]._parameters["weight"],
                       mlp._modules["down"]._parameters["weight"])
            if step_cpu.serves_step("residual_swiglu_step", x, y, *weights):
                return step_cpu.residual_swiglu_step(x, y, weights[0], norm.eps, *weights[1:]), state
        x = x + y
        return x + mlp(norm(x)), state

    def cpu_decoding_step(self, like: torch.Tensor, state: State, options: dict) -> DecodingStep | None:
        """The block's one-token step as C++ calls bound to its weights as they are now (the mixer's norm, its
        :meth:`Mixer.cpu_decoding_step` (with the step ``options`` where it :attr:`takes_steps`), the residual and
        the MLP, or with :attr:`replaces_stream` the mixer's output as the stream): ``x, state = step(x, state)``,
        x [B, hidden]. The calls :meth:`forward` makes for a decoding step on CPU tensors, without its module
        calls. None where the mixer has no such step or the C++ steps do not serve ``like``."""
        parts = self.cpu_decoding_parts(like, state, options)
        return None if parts is None else bound_block_step(parts)

    def cpu_decoding_parts(self, like: torch.Tensor, state: State, options: dict) -> step_cpu.DecoderBlock | None:
        """What :meth:`cpu_decoding_step` is made of: the mixer's bound step (``call``), its norm's weight and eps,
        and the MLP's norm weight, eps, gate_up and down (None with :attr:`replaces_stream`); None where they do
        not serve ``like``. Where ``call`` is a :class:`~seqmix.kernels.step_cpu.LayerCall` and the MLP follows
        it, the block can be one of an LM's C++ decoding token (:func:`seqmix.kernels.step_cpu.decoder`)."""
        mixer_norm = self.mixer_norm
        mixer_step = self.mixer.cpu_decoding_step(like, state, **(options if self.takes_steps else {}))
        if mixer_step is None or mixer_norm.weight.dtype != like.dtype:
            return None
        if self.replaces_stream:
            return step_cpu.DecoderBlock(mixer_step, mixer_norm.weight, mixer_norm.eps, None, None, None, None)
        mlp_norm, mlp = self.mlp_norm, self.mlp
        weights = (mlp_norm.weight, mlp.gate_up.weight, mlp.down.weight)
        if not step_cpu.serves_step("residual_swiglu_step", like, *weights):
            return None
        return step_cpu.DecoderBlock(mixer_step, mixer_norm.weight, mixer_norm.eps, weights[0], mlp_norm.eps,
                                     *weights[1:])


def bound_block_step(parts: step_cpu.DecoderBlock) -> DecodingStep:
    """A block's decoding step (:meth:`Block.cpu_decoding_step`) from its parts."""
    mixer_step, norm_weight, norm_eps = parts.call, parts.mixer_norm, parts.mixer_eps
    row_norm = step_cpu.row_norm.bind(norm_weight)
    if parts.mlp_norm is None:
        return lambda x, state: mixer_step(row_norm(x, norm_weight, None, norm_eps, True), state)
    mlp = parts[3:]
    residual_swiglu_step = step_cpu.residual_swiglu_step.bind(mlp[0], *mlp[2:])

    def step(x, state):
        y, state = mixer_step(row_norm(x, norm_weight, None, norm_eps, True), state)
        return residual_swiglu_step(x, y, *mlp), state

    return step


class LanguageModel(nn.Module):
    """``logits, state = model(tokens, state=None, *, cu_seqlens=None, attention_mask=None)``.

    tokens [B, T] (int64), logits [B, T, vocab_size]. ``state`` is a list with one mixer
    state per layer (from :meth:`init_state` or a previous call); with ``state=None`` the
    call trains and no state comes back. ``cu_seqlens`` and ``attention_mask`` are passed to
    every mixer (see :class:`seqmix.archs.Mixer`). ``num_steps``, ``backprop_steps`` and ``exit_threshold``
    go to the layers that iterate (``recurrent_depth``; see :class:`seqmix.archs.RecurrentDepth`).
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, name) for name in config.layers)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self._init_weights()

    def _init_weights(self):
        # The mixers keep their own initialisation (e.g. Mamba's dt and A); the embedding, which
        # is also the head, and the MLPs get the usual normal(0.02), and the projections that write
        # into the residual stream are scaled down by sqrt(2 * layers).
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.blocks:
            if block.replaces_stream:
                continue
            nn.init.normal_(block.mlp.gate_up.weight, std=std)
            nn.init.normal_(block.mlp.down.weight, std=std / math.sqrt(2 * len(self.blocks)))

    def forward(self, tokens, state: list[State] | None = None, *, cu_seqlens=None, attention_mask=None,
                num_steps: int | None = None, backprop_steps: int | None = None, exit_threshold: float | None = None):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64:
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an int64 tensor [B, T], got {got}")
        _check_token_range(tokens, self.config.vocab_size)
        if state is not None and len(state) != len(self.blocks):
            raise ValueError(f"state must hold one entry per layer ({len(self.blocks)}), got {len(state)}")
        steps = self._step_options(num_steps, backprop_steps, exit_threshold)
        return self._run(tokens, state, steps, cu_seqlens, attention_mask)

    def _run(self, tokens, state, steps, cu_seqlens=None, attention_mask=None):
        """:meth:`forward` after its checks of the tokens, the state's length and the step options."""
        x = self.embed(tokens)
        new_state = []
        for i, block in enumerate(self.blocks):
            block.mixer.observe_tokens(tokens)
            options = steps if block.takes_steps else {}
            x, s = block(x, None if state is None else state[i], cu_seqlens, attention_mask, **options)
            new_state.append(s)
        logits = self._readout(x)
        return logits, (None if state is None else new_state)

    def _cpu_decoder(self, state: list[State], options: dict) -> Callable | None:
        """:meth:`generate`'s decoding step as C++ calls bound to the weights as they are now, no module call in
        between: ``logits, state = decode(tokens, state)``, tokens [B, 1], logits [B, vocab] float32. Where every
        block's mixer step is one C++ call followed by the MLP (:meth:`Block.cpu_decoding_parts`: a LayerCall, or an
        hourglass layer's ProgramCall), the whole token is one C++ call (step_cpu.decoder, which writes some states in
        place: the loop owns them); else each block's :meth:`Block.cpu_decoding_step` and the final norm and the head
        in one. The per-token Python of the module calls is about as long as the C++ steps themselves at small sizes
        (docs/design.md, "Twentieth round"). None unless every block has such a step for this state (then
        :meth:`_decode` serves)."""
        embed, norm = self.embed.weight, self.norm
        like = embed.detach()[:0]
        if torch.is_grad_enabled() or not step_cpu.serves_step("rms_norm_times_weight", like, norm.weight):
            return None
        # The layers with an adaptive exit read the logits of their latents: the readout's weights for their C++ calls.
        options = {**options, "head": (norm.weight, norm.eps, embed)} if options.get("readout") else options
        blocks = [block.cpu_decoding_parts(like, s, options) for block, s in zip(self.blocks, state)]
        if any(parts is None for parts in blocks):
            return None
        one_call = (step_cpu.LayerCall, step_cpu.ProgramCall)
        if all(type(parts.call) in one_call and parts.mlp_norm is not None for parts in blocks):
            return step_cpu.decoder(embed, norm.weight, norm.eps, blocks)
        steps = [bound_block_step(parts) for parts in blocks]
        norm_weight, eps = norm.weight, norm.eps
        readout = step_cpu.rms_norm_times_weight.bind(norm_weight, embed)
        # The layers that read the token ids (the whitespace hourglass's boundaries) see them as in forward.
        observers = [block.mixer.observe_tokens for block in self.blocks
                     if type(block.mixer).observe_tokens is not Mixer.observe_tokens]

        def decode(tokens, state):
            for observe in observers:
                observe(tokens)
            x = embed.index_select(0, tokens.view(-1))
            new_state = []
            for step, s in zip(steps, state):
                x, s = step(x, s)
                new_state.append(s)
            return in_dtype(readout(x, norm_weight, eps, embed), torch.float32), new_state

        return decode

    def _decoder(self, state: list[State], steps: dict, compile: bool) -> Callable:
        """:meth:`generate`'s per-token step, ``logits, state = decode(tokens, state)``: the bound C++ steps
        (:meth:`_cpu_decoder`) where they serve and ``compile`` is off, else :meth:`_decode` with the step
        options ``steps`` (through ``torch.compile(fullgraph=True)`` with ``compile``)."""
        decode = None if compile else self._cpu_decoder(state, steps)
        if decode is not None:
            return decode
        run = torch.compile(self._decode, fullgraph=True) if compile else self._decode
        return lambda tokens, state: run(tokens, state, steps)

    def _readout(self, x):
        norm, head = self._modules["norm"], self._modules["embed"]._parameters["weight"]
        B, T, D = x.shape
        if T == 1 and not torch.is_grad_enabled() and step_cpu.serves_step("rms_norm_times_weight", x, head,
                                                                           norm._parameters["weight"]):
            return step_cpu.rms_norm_times_weight(x.reshape(B, D), norm._parameters["weight"], norm.eps,
                                                  head).view(B, 1, head.shape[0])
        return linear(norm(x), head)

    def _step_options(self, num_steps, backprop_steps, exit_threshold) -> dict:
        options = {"num_steps": num_steps, "backprop_steps": backprop_steps, "exit_threshold": exit_threshold}
        given = [name for name, value in options.items() if value is not None]
        if given and not any(getattr(b.mixer, "takes_steps", False) for b in self.blocks):
            raise ValueError(f"{', '.join(given)} given, but no layer iterates (layers {self.config.layers})")
        # The adaptive exit's predictions: the final norm and the head on the latent (the coda is skipped).
        return {**options, "readout": self._readout if exit_threshold is not None else None}

    def init_state(self, batch_size: int, num_steps: int | None = None, capacity: int = 0) -> list[State]:
        """The empty states; layers that iterate keep ``num_steps`` iterations (their default when None), and
        attention caches preallocate ``capacity`` positions (in-place decoding)."""
        return [init_mixer_state(block.mixer, batch_size, num_steps=num_steps, capacity=capacity)
                for block in self.blocks]

    def auxiliary(self, logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mixers' auxiliary terms of the last training call (see :meth:`Mixer.auxiliary`): the sum of
        their losses (a scalar to add to the LM loss; 0 when none has one) and every logged scalar, keyed
        ``layer<i>.<name>``."""
        total, metrics = logits.new_zeros((), dtype=torch.float32), {}
        for i, block in enumerate(self.blocks):
            for name, value in block.mixer.auxiliary(logits).items():
                if name == "loss":
                    total = total + value
                metrics[f"layer{i}.{name}"] = value.detach()
        return total, metrics

    def decode_step(self, tokens: torch.Tensor, state: list[State], num_steps: int | None = None,
                    exit_threshold: float | None = None) -> tuple[torch.Tensor, list[State]]:
        """One decoding step: the next token of each sequence, tokens [B, 1] (int64), after ``state``.

        Returns the logits of the token after it, [B, vocab] float32, and the new state. Every mixer
        takes its one-token step (docs/design.md, "The decoding step"): no host synchronisation and no
        shape change, so ``torch.compile(fullgraph=True)`` traces it as one graph (with an attention
        layer, when its cache was preallocated: ``init_state(..., capacity=)``).
        """
        logits, state = self(tokens, state, num_steps=num_steps, exit_threshold=exit_threshold)
        return logits[:, -1].float(), state

    def _decode(self, tokens: torch.Tensor, state: list[State], steps: dict) -> tuple[torch.Tensor, list[State]]:
        """:meth:`decode_step` without its checks, for :meth:`generate`'s loop: the prompt, the state and the
        options were checked by the prefill, and each token comes from the sampler, in [0, vocab_size) by
        construction (so no per-token range check, which on the CPU also waits for the result)."""
        logits, state = self._run(tokens, state, steps)
        return in_dtype(logits[:, -1], torch.float32), state

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 return_logits: bool = False, num_steps: int | None = None, exit_threshold: float | None = None,
                 on_token: Callable[[torch.Tensor], None] | None = None, compile: bool = False):
        """Sample ``max_new_tokens`` after ``prompt`` [B, T] with the mixers' states.

        The prompt is prefilled in one call (which checks the prompt, the state and the options), then one
        :meth:`decode_step` per token without its per-call checks (each token comes from the sampler); on the
        CPU, when every layer has a one-call C++ step, those steps bound once (:meth:`_cpu_decoder`: the same
        calls without the modules around them, so the weights must not change during the call).
        ``temperature=0`` is greedy; ``top_k`` keeps the k most likely tokens (the draw:
        :func:`seqmix.kernels.sampling.token_sampler`, from ``generator``); ``num_steps`` and
        ``exit_threshold`` go to the layers that iterate (see :meth:`forward`); ``on_token`` is called with each
        step's new tokens [B, 1] as soon as they are drawn (streaming). ``compile=True`` runs the step through
        ``torch.compile(fullgraph=True)`` (seconds of compilation first; see docs/design.md, "The decoding
        step", for when it pays). Returns
        tokens [B, T + max_new_tokens], and with ``return_logits`` also the logits each new token was drawn
        from, [B, max_new_tokens, vocab].
        """
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be [B, T] with T >= 1, got {tuple(prompt.shape)}")
        B, T = prompt.shape
        # The sampler first: it checks temperature and top_k against the vocabulary before any work.
        sample = token_sampler(temperature, top_k, generator, prompt.new_empty(B, self.config.vocab_size,
                                                                               dtype=torch.float32))
        # Caches sized for the whole generation: each decoding step writes in place (no host sync, no shape change).
        state = self.init_state(B, num_steps=num_steps, capacity=T + max_new_tokens)
        logits, state = self(prompt, state, num_steps=num_steps, exit_threshold=exit_threshold)
        step = logits[:, -1].float()
        decode = self._decoder(state, self._step_options(num_steps, None, exit_threshold), compile)
        tokens, steps = [prompt], []  # joined once at the end: a slice assignment a token cost ~3 us
        for i in range(max_new_tokens):
            steps.append(step)
            tokens.append(token := sample(step))
            if on_token is not None:
                on_token(token)
            if i + 1 < max_new_tokens:  # the last token's successor is not asked for
                step, state = decode(token, state)
        out = torch.cat(tokens, 1)
        if not return_logits:
            return out
        return out, torch.stack(steps, 1) if steps else prompt.new_zeros(B, 0, self.config.vocab_size)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``. The config's ``model_type`` lets
        transformers' ``AutoModelForCausalLM`` load the directory too (:mod:`seqmix.hf`)."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"model_type": MODEL_TYPE, **self.config.to_dict()}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_model(self, str(directory / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> LanguageModel:
        """Build the model from ``config.json`` and load ``model.safetensors`` (no pickle involved); also reads
        a directory written by transformers' ``save_pretrained`` of :class:`seqmix.hf.SeqmixForCausalLM`."""
        from safetensors.torch import load_model

        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} does not exist")
        model = cls(read_config(directory / CONFIG_FILE))
        try:
            load_model(model, str(directory / WEIGHTS_FILE), strict=True, device=str(device))
        except RuntimeError as e:
            raise ValueError(f"{directory / WEIGHTS_FILE} does not fit {directory / CONFIG_FILE}: {e}") from None
        return model.to(device)


def read_config(path: Path) -> LMConfig:
    """The LMConfig of a ``config.json``. One with ``model_type`` "seqmix" may also hold transformers' metadata
    (``architectures``, token ids, ...; :mod:`seqmix.hf`), which is left out; any other unknown key is an error."""
    values = json.loads(path.read_text())
    model_type = values.pop("model_type", None)
    names = {f.name for f in dataclasses.fields(LMConfig)}
    if model_type is not None:
        if model_type != MODEL_TYPE:
            raise ValueError(f"{path}: model_type {model_type!r} is not a seqmix model ({MODEL_TYPE!r})")
        values = {k: v for k, v in values.items() if k in names}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{path}: unknown config field(s) {unknown}; LMConfig fields: {sorted(names)}")
    return LMConfig(**values)


def _check_token_range(tokens: torch.Tensor, vocab_size: int) -> None:
    """Token ids must index the embedding: [0, vocab_size). A ValueError on CPU tensors; on CUDA tensors and
    while compiling an asynchronous device assertion (checks.check_values), so a decoding step neither
    synchronises with the host nor breaks its graph."""
    if tokens.numel():
        check_values(((tokens >= 0) & (tokens < vocab_size)).all(),
                     f"tokens must be ids in [0, vocab_size={vocab_size})",
                     lambda: f"values from {int(tokens.min())} to {int(tokens.max())}")
