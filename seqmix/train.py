"""Train a small byte-level language model from scratch with any of seqmix's mixers.

    python -m seqmix.train --config tiny                       # a bundled config (seqmix/configs/tiny.yaml)
    python -m seqmix.train --config my.yaml --steps 2000 --model.layers "[deltanet*3, attention]"
    torchrun --nproc-per-node 4 -m seqmix.train --config gpu-50m --data /path/to/text

Every field of :class:`TrainConfig` (and ``--model.<field>`` of :class:`~seqmix.archs.lm.LMConfig`)
is a flag; values are read as YAML (``--model.layers "[deltanet, attention]"``). Order of precedence:
defaults, then the ``--config`` file (YAML or JSON), then flags.

The run directory (``out_dir``) gets ``log.jsonl`` (one JSON object per logged step), ``checkpoint.pt``
(model, optimizer, step, RNG states; written atomically), ``model/`` (safetensors weights and
``config.json``, for :meth:`LanguageModel.from_pretrained`) and ``loss.png``. ``--resume`` continues
from ``checkpoint.pt`` and gives, step for step, the run that was not interrupted; with another
``--steps`` it extends the run (:func:`lr_at`). ``--help`` lists every flag with its default, the
mixers with their options and the bundled configs; bad values exit with status 2 before anything is
written. The token cache is ``$SEQMIX_CACHE`` (default ``~/.cache/seqmix``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import sys
import textwrap
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqmix.archs import MIXERS
from seqmix.archs.lm import LanguageModel, LMConfig, mixer_option_names
from seqmix.data import VOCAB_SIZE, Corpus, cache_root, load_corpus

CONFIG_DIR = Path(__file__).parent / "configs"
# Fields that change what a run computes; a checkpoint resumes only under the same values. Besides these,
# ``steps`` may differ: a resume to another total extends (or shortens) the run (see lr_at).
_PRESENTATION_FIELDS = {"progress", "log_every", "eval_every", "save_every", "compile", "resume", "out_dir",
                        "eval_num_steps", "steps"}


class ConfigError(ValueError):
    """A run that cannot start: reported before anything is trained or written."""


CHECKPOINT, LOG, PLOT, MODEL_DIR = "checkpoint.pt", "log.jsonl", "loss.png", "model"


def _setting(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, help: str) -> dataclasses.Field:
    """A config field with its description (``--help`` shows it beside the default)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class TrainConfig:
    """One training run: every field is a flag of ``seqmix-train`` (``metadata["help"]`` describes it)."""

    model: LMConfig = field(default_factory=LMConfig)
    data: str | None = _setting(None, help="training text: null for the Python standard library's source and text "
                                           "files, or a text file, a directory of them, or the name of a Hugging "
                                           "Face dataset in the local cache")
    out_dir: str = _setting("runs/seqmix", help="the run directory (log, checkpoint, model, plot)")
    seq_len: int = _setting(256, help="tokens (bytes) per training sequence")
    batch_size: int = _setting(16, help="sequences per optimizer step, all processes and accumulation steps together")
    grad_accum: int = _setting(1, help="micro-batches per optimizer step")
    steps: int = _setting(200, help="optimizer steps in all; with --resume, a new total extends (or shortens) the "
                                    "run, the learning rate decaying from where it is to min_lr at the new total")
    lr: float = _setting(3e-3, help="peak learning rate (AdamW), reached after the warmup")
    min_lr: float = _setting(3e-4, help="learning rate at the last step (cosine decay)")
    warmup_steps: int = _setting(20, help="steps of linear warmup from 0 to lr")
    weight_decay: float = _setting(0.1, help="AdamW weight decay (not on norm weights, biases, A_log, dt_bias, D)")
    beta1: float = _setting(0.9, help="AdamW beta1")
    beta2: float = _setting(0.95, help="AdamW beta2")
    grad_clip: float = _setting(1.0, help="clip the gradient norm to this; 0: no clipping")
    eval_every: int = _setting(100, help="steps between validation evaluations (and after the last step)")
    eval_tokens: int = _setting(65536, help="validation tokens per evaluation")
    save_every: int = _setting(100, help="steps between checkpoints (and after the last step)")
    log_every: int = _setting(10, help="steps between log.jsonl entries")
    seed: int = _setting(0, help="seed of the initialisation, the batches and every random draw")
    device: str = _setting("auto", help="auto (cuda when available, cuda:LOCAL_RANK under torchrun, else cpu), cpu, "
                                        "cuda or cuda:N")
    autocast: str = _setting("auto", help="auto (bf16 on GPU, none on CPU), bf16, fp16 or none")
    compile: bool = _setting(False, help="torch.compile the model")
    eval_num_steps: list[int] = _setting(factory=list, help="recurrent_depth models: validation bits per byte at each "
                                                            "of these depths r after the last step (also on a --resume "
                                                            "of a finished run, which then only evaluates)")
    progress: bool = _setting(True, help="show a progress bar")
    resume: bool = _setting(False, help=f"continue the run in --out-dir from its {CHECKPOINT}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- configuration -----------------------------------------------------------------------------


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from nested plain values (a config file's, or flags'); unknown keys and values of the wrong
    type are errors (ConfigError naming the key)."""
    values = dict(values)
    model = values.pop("model", {}) or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model must be a mapping of model settings, got {model!r}")
    for cls, given, where in ((TrainConfig, values, ""), (LMConfig, model, "model.")):
        unknown = sorted(set(given) - set(_fields(cls)) - {"model"})
        if unknown:
            raise ConfigError(f"unknown config key(s) {[where + k for k in unknown]}")
    values = _typed_values(TrainConfig, values, "")
    model = _typed_values(LMConfig, model, "model.")
    if model.get("mixer_options"):
        model["mixer_options"] = {name: _typed_mixer_options(name, options)
                                  for name, options in model["mixer_options"].items()}
    try:
        model = LMConfig(**model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    return TrainConfig(model=model, **values)


def _typed_values(cls, values: dict, where: str) -> dict:
    """``values`` checked against the field types of ``cls`` (ConfigError naming the key and its flag), with
    numbers given as strings read as floats: YAML 1.1 reads ``1e-3`` (no dot) as a string."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        typed = _typed(value, hints[key])
        if typed is _WRONG:
            flag = "--" + where + key.replace("_", "-")
            raise ConfigError(f"{where}{key} ({flag}) must be {_describe(hints[key])}, got {value!r}")
        out[key] = typed
    return out


def _typed_mixer_options(name: str, options):
    """Mixer ``name``'s options checked against its constructor's annotations; unknown mixers and option
    names are left to LMConfig.validate, which lists the valid ones."""
    if name not in MIXERS or not isinstance(options, dict):
        return options
    hints = typing.get_type_hints(MIXERS[name].__init__)
    typed = {}
    for key, value in options.items():
        typed[key] = _typed(value, hints[key]) if key in hints else value
        if typed[key] is _WRONG:
            raise ConfigError(f"model.mixer_options.{name}.{key} must be {_describe(hints[key])}, got {value!r}")
    return typed


_WRONG = object()


def _typed(value, hint):
    """``value`` as type ``hint`` (int, float, str, bool, X | None, list[X], dict[K, V]), or _WRONG. A list of
    strings also takes one string (LMConfig splits ``layers`` at commas)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            typed = _typed(value, arg)
            if typed is not _WRONG:
                return typed
        return _WRONG
    if hint is type(None):
        return None if value is None else _WRONG
    if hint is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _WRONG
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _WRONG
    if hint in (str, bool):
        return value if isinstance(value, hint) else _WRONG
    if origin is list:
        if args == (str,) and isinstance(value, str):
            return value
        items = [_typed(v, args[0]) for v in value] if isinstance(value, list) else [_WRONG]
        return _WRONG if any(v is _WRONG for v in items) else items
    if origin is tuple:  # kept a list, as YAML and JSON give it (a checkpoint's config compares equal)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return _WRONG
        items = [_typed(v, arg) for v, arg in zip(value, args)]
        return _WRONG if any(v is _WRONG for v in items) else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return _WRONG
        key_type, value_type = args or (str, object)
        if value_type is object or all(_typed(v, value_type) is not _WRONG for v in value.values()):
            return value if all(isinstance(k, key_type) for k in value) else _WRONG
        return _WRONG
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _WRONG
    return value  # a type this check does not know (e.g. a callable): the constructor judges it


def _describe(hint) -> str:
    """The type ``hint`` in words, for error messages and --help."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        extra = " (or a comma-separated string)" if args == (str,) else ""
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s{extra}"
    if origin is tuple:
        return f"a list of {len(typing.get_args(hint))} ({', '.join(_describe(a) for a in typing.get_args(hint))})"
    if origin is dict or hint is dict:
        return "a mapping"
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return words.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _read_config_file(name: str) -> dict:
    path = Path(name)
    if not path.exists() and not path.suffix:
        path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--config {name!r}: no such file (bundled configs: {sorted(bundled_configs())})")
    import yaml

    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {name!r}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {name!r}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def bundled_configs() -> dict[str, str]:
    """The bundled configs (``--config NAME``) and the first comment line of each, which describes it."""
    described = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        comments = [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
        described[path.stem] = comments[0] if comments else ""
    return described


def _yaml_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not valid YAML: {' '.join(str(e).split())}") from None


def _default_text(f: dataclasses.Field) -> str:
    import yaml

    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if f.name == "intermediate_size" and value is None:
        return "null (8/3 hidden_size)"
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()


def _epilog() -> str:
    mixers = "\n".join(textwrap.fill(", ".join(mixer_option_names(name)) or "-", width=100,
                                      initial_indent=f"  {name:<17}", subsequent_indent=" " * 19)
                       for name in sorted(MIXERS))
    configs = "\n".join(f"  {name:<17}{text}" for name, text in bundled_configs().items())
    return f"""examples:
  seqmix-train --config tiny                                 # seqmix/configs/tiny.yaml -> runs/tiny
  seqmix-train --config tiny --model.layers deltanet,attention*2 --out-dir runs/mine
  seqmix-train --config tiny --resume                        # continue an interrupted run
  seqmix-train --config tiny --resume --steps 400            # extend a run (finished or not) to 400 steps
  torchrun --nproc-per-node 2 -m seqmix.train --config tiny --out-dir runs/ddp

Values are read as YAML ("[deltanet, attention]", "{{mamba: {{d_state: 8}}}}", 1.0e-3). Precedence:
defaults, then the --config file (YAML or JSON), then flags. Bad values are refused before anything
is written (exit status 2).

mixers (--model.layers) and the options each takes (--model.mixer-options "{{name: {{option: value}}}}"):
{mixers}

bundled configs (--config NAME, in {CONFIG_DIR}):
{configs}

--resume with a larger --steps extends a run: from the step of its checkpoint the learning rate decays
by a cosine from the value it had reached (min_lr when the run had finished) to min_lr at the new total,
so it never jumps. A finished run resumed with nothing to do says so and exits.

The token cache is {cache_root()} ($SEQMIX_CACHE, default ~/.cache/seqmix). The run prints, per layer, which kernel
backend each op takes on this device and why (SEQMIX_BACKEND=reference|triton|cuda steers them).
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--config``, one flag per field of TrainConfig and LMConfig (``--model.<field>``),
    ``--resume``; each flag's help is its field's description and default."""
    parser = argparse.ArgumentParser(prog="seqmix-train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    parser.add_argument("--config", metavar="FILE_OR_NAME",
                        help=f"a YAML/JSON file of settings, or a bundled config ({', '.join(bundled_configs())})")
    for prefix, cls, title in (("", TrainConfig, "training"), ("model.", LMConfig, "model")):
        group = parser.add_argument_group(f"{title} settings")
        hints = typing.get_type_hints(cls)
        for name, f in _fields(cls).items():
            if name == "model":
                continue
            flag = "--" + prefix + name.replace("_", "-")
            if name == "resume":
                group.add_argument(flag, action="store_true", help=f.metadata["help"])
                continue
            text = f"{f.metadata['help']}; {_describe(hints[name])} (default: {_default_text(f)})"
            group.add_argument(flag, dest=prefix.replace(".", "__") + name, type=_yaml_value, metavar="VALUE",
                               help=text.replace("%", "%%"))
    return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> TrainConfig:
    """The TrainConfig of a command line (ConfigError for bad values; argparse exits on malformed flags)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    values = _read_config_file(args.config) if args.config else {}
    values.setdefault("model", {})
    for prefix, cls in (("", TrainConfig), ("model.", LMConfig)):
        for name in _fields(cls):
            value = getattr(args, prefix.replace(".", "__") + name, None)
            if name not in ("model", "resume") and value is not None:
                (values["model"] if prefix else values)[name] = value
    values["resume"] = args.resume or values.get("resume", False)
    return config_from_dict(values)


def validate(config: TrainConfig, world: int) -> None:
    """Every check that needs no data or model: raises ConfigError naming the field."""
    try:
        config.model.validate(min_vocab=VOCAB_SIZE)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_tokens", "log_every", "eval_every", "save_every"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if config.batch_size % (config.grad_accum * world):
        raise ConfigError(f"batch_size={config.batch_size} must divide evenly into grad_accum={config.grad_accum} "
                          f"x {world} process(es)")
    for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip"):
        if not math.isfinite(getattr(config, name)):
            raise ConfigError(f"{name} must be a finite number, got {getattr(config, name)!r}")
    if not 0 <= config.min_lr <= config.lr or config.lr == 0:
        raise ConfigError(f"need 0 <= min_lr <= lr and lr > 0, got min_lr={config.min_lr}, lr={config.lr}")
    if not (0 <= config.beta1 < 1 and 0 <= config.beta2 < 1):
        raise ConfigError(f"beta1 and beta2 must be in [0, 1), got {config.beta1}, {config.beta2}")
    if config.autocast not in ("auto", "bf16", "fp16", "none"):
        raise ConfigError(f"autocast must be auto, bf16, fp16 or none, got {config.autocast!r}")
    if config.warmup_steps < 0 or config.grad_clip < 0 or config.weight_decay < 0:
        raise ConfigError("warmup_steps, grad_clip and weight_decay must be >= 0")
    _check_device(config.device)
    steps = config.eval_num_steps
    if not isinstance(steps, list) or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in steps):
        raise ConfigError(f"eval_num_steps must be a list of integers >= 1, got {steps!r}")
    if steps and not any(getattr(MIXERS[name], "takes_steps", False) for name in config.model.layers):
        raise ConfigError(f"eval_num_steps is given but no layer iterates (layers {config.model.layers})")


def _check_device(name: str) -> None:
    """``device`` names a device that this machine has (or is auto)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {name!r}: torch sees no CUDA GPU on this machine (use --device cpu or auto)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        module = getattr(torch, device.type, None)
        if module is None or not module.is_available():
            raise ConfigError(f"device {name!r} is not available on this machine")


def lr_at(config: TrainConfig, step: int, schedule: list[tuple[int, int]] | None = None) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr`` at ``steps``.

    ``schedule`` lists the run's segments ``(start, end)``: ``[(0, steps)]`` for a run that was never extended
    (the default). A ``--resume`` to another total appends ``(step, total)``: from that step (or from the end
    of the warmup, if later) the learning rate follows a cosine from the value it had there down to ``min_lr``
    at the new total, so it never jumps; a finished run has reached ``min_lr`` and stays there.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    schedule = schedule or [(0, config.steps)]
    peak, start, end = config.lr, config.warmup_steps, schedule[0][1]
    for segment_start, segment_end in schedule[1:]:
        if step < segment_start:
            break
        first = max(segment_start, config.warmup_steps)
        peak, start, end = _cosine(config, peak, start, end, first), first, segment_end
    return _cosine(config, peak, start, end, step)


def _cosine(config: TrainConfig, peak: float, start: int, end: int, step: int) -> float:
    """From ``peak`` at ``start`` down to ``min_lr`` at ``end`` (and after), half a cosine."""
    progress = min(1.0, (step - start) / max(1, end - start))
    return config.min_lr + 0.5 * (peak - config.min_lr) * (1 + math.cos(math.pi * progress))


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _device(config: TrainConfig, d: Dist) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device(f"cuda:{d.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def keep_freed_cpu_memory() -> bool:
    """Has glibc's malloc keep freed memory in the process; returns whether it could (False without glibc).

    CPU tensors come from malloc. By default glibc hands blocks above a threshold (128 KB, raised to the largest
    such block freed so far) to mmap and back to the kernel when they are freed, and returns the top of its heap
    once more than twice that lies free there. A training step frees most of what it allocated, so on the next
    one the kernel faults those pages in again and zeroes them: Mamba-2's step on the CPU faulted 10-100 MB a step
    that way (docs/design.md, "Ninth round"). Fixing the thresholds (32 MB, glibc's largest for mmap; 1 GB for
    the trim) keeps the memory for the next step. A process-wide setting: the trainer and the benchmarks call it,
    the library's modules do not.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1


def _autocast(config: TrainConfig, device: torch.device):
    kind = config.autocast
    if kind == "auto":
        kind = "bf16" if device.type == "cuda" else "none"
    if kind == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if kind == "bf16" else torch.float16)


def _optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Weight decay on every parameter except those a module marks with seqmix.archs.modules.no_weight_decay
    # (norm weights, biases, A_log, dt_bias, D); a 2-D A_log (Mamba's) is marked, not decayed.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if not getattr(p, "no_weight_decay", False)]
    no_decay = [p for p in params if getattr(p, "no_weight_decay", False)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused on the CPU too: the for-loop implementation (torch's CPU default) runs a few ops per tensor, 2.6 ms
    # a step for the tiny attention LM's 14 tensors and 6.1 ms for Mamba-2's 26; fused, 0.3 and 0.8 ms
    # (docs/design.md, "Twelfth round").
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             fused=device.type in ("cpu", "cuda"))


def _batch(corpus: Corpus, config: TrainConfig, step: int, micro: int, d: Dist, device):
    """This process's share of micro-batch ``micro`` of step ``step``.

    The global batch of a step is drawn from a generator seeded by (seed, step) alone, the
    same in every process, so the data position is the step: resuming needs no data state,
    and N processes see exactly the batch that one process would.
    """
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    starts = corpus.random_starts(generator, config.batch_size, config.seq_len)
    per = config.batch_size // (config.grad_accum * d.world)
    first = (micro * d.world + d.rank) * per
    x, y = corpus.batch("train", starts[first : first + per], config.seq_len)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _depth(model: LanguageModel, config: TrainConfig, step: int) -> dict:
    """The recurrent-depth layers' (r, k) for ``step``: drawn from a generator seeded by (seed, step) alone,
    so every process draws the same r (one graph shape across DDP ranks) and a resume draws the same ones.
    Empty for models without such layers."""
    layer = next((b.mixer for b in model.blocks if getattr(b.mixer, "takes_steps", False)), None)
    if layer is None:
        return {}
    # A stream apart from the data's (seeded by seed * 1_000_003 + step): the high bit keeps the two seeds distinct.
    generator = torch.Generator().manual_seed((config.seed * 1_000_003 + step) | (1 << 62))
    r, k = layer.sample_steps(generator)
    return {"num_steps": r, "backprop_steps": k}


def _loss(model, x, y, config, device):
    return _losses(model, model, x, y, config, device)[0]


def _losses(step_fn, model, x, y, config, device, depth=None):
    """The LM loss, the mixers' auxiliary loss (added to it for the backward) and their logged scalars
    (:meth:`LanguageModel.auxiliary`); ``step_fn`` is the (wrapped) model that runs the forward, ``depth``
    the recurrent-depth layers' (r, k) of this step (:func:`_depth`)."""
    with _autocast(config, device):
        logits, _ = step_fn(x, **(depth or {}))
    aux, aux_metrics = model.auxiliary(logits)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), aux, aux_metrics


@torch.no_grad()
def evaluate(model, corpus: Corpus, config: TrainConfig, d: Dist, device, num_steps: int | None = None) -> float:
    """Validation bits per byte: the summed cross-entropy over the validation windows, in bits,
    divided by the number of byte targets (the document-start tokens cost bits but are not bytes).
    ``num_steps``: the depth r of recurrent-depth layers (their default when None)."""
    model.eval()
    starts = corpus.val_starts(config.seq_len, config.eval_tokens)[d.rank :: d.world]
    per = max(1, config.batch_size // (config.grad_accum * d.world))
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, len(starts), per):
        x, y = corpus.batch("val", starts[i : i + per], config.seq_len)
        x, y = x.to(device), y.to(device)
        with _autocast(config, device):
            logits, _ = model(x) if num_steps is None else model(x, num_steps=num_steps)
        totals[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
        totals[1] += (y < 256).sum()
    if d.world > 1:
        dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[1].clamp_min(1) / math.log(2)).item()


def _rng_state(device) -> dict:
    # torch's generators are the only ones the trainer and the models draw from (the data has its
    # own per-step generator); NumPy's and Python's are not used.
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
    }


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, model, optimizer, step: int, config: TrainConfig, device,
                    schedule: list[tuple[int, int]]) -> None:
    """Write the checkpoint to a temporary file, flush it to disk, then rename it over ``path``:
    a process killed mid-save leaves the previous checkpoint as it was. ``schedule``: the learning rate's
    segments (:func:`lr_at`)."""
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
        "config": config.to_dict(), "rng": _rng_state(device), "schedule": [list(s) for s in schedule],
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, config: TrainConfig) -> dict:
    """The checkpoint at ``path``, refused (ConfigError) when another config wrote it.

    Loaded with ``weights_only=True``: tensors and plain containers only, nothing unpickled.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved, current = state["config"], config.to_dict()
    diffs = _config_diff(saved, current)
    if diffs:
        raise ConfigError(f"{path} was written by another config ({'; '.join(diffs)}); "
                          f"resume with the same config or use another --out-dir")
    if config.steps < state["step"]:
        raise ConfigError(f"--resume: {path} is at step {state['step']}, past steps={config.steps}; "
                          f"give --steps {state['step']} or more")
    return state


def resumed_schedule(state: dict, config: TrainConfig) -> list[tuple[int, int]]:
    """The learning-rate segments (:func:`lr_at`) of a run resumed from checkpoint ``state`` with ``config``:
    the checkpoint's, plus ``(step, config.steps)`` when the total changed."""
    schedule = [tuple(s) for s in state.get("schedule", [(0, state["config"]["steps"])])]
    if schedule[-1][1] == config.steps:
        return schedule
    return [s for s in schedule if s[0] < state["step"]] + [(state["step"], config.steps)]


def _config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in _PRESENTATION_FIELDS:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key == "model":
            diffs += _config_diff(a, b, "model.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return diffs


class RunLog:
    """``log.jsonl`` in the run directory; on resume, entries after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def entries(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []


def plot_losses(entries: list[dict], path: Path) -> None:
    """Train loss (nats per token: the targets are bytes and document-start tokens) and validation loss
    (nats per byte) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in entries if "val_loss" in e]
    for points, label, style in ((train, "train (nats / token)", "-"), (val, "validation (nats / byte)", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    if val:
        ax.set_title(f"final validation: {val[-1][1] / math.log(2):.3f} bits per byte")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _prepare(config: TrainConfig, d: Dist):
    """All checks and loading that can fail (after :func:`validate`), before any training step or write."""
    out = Path(config.out_dir)
    checkpoint = out / CHECKPOINT
    if config.resume and not checkpoint.is_file():
        raise ConfigError(f"--resume: {checkpoint} does not exist")
    if not config.resume and checkpoint.exists():
        raise ConfigError(f"{out} already holds a run ({checkpoint}); pass --resume to continue it "
                          f"or choose another --out-dir (nothing was overwritten)")
    state = load_checkpoint(checkpoint, config) if config.resume else None
    torch.manual_seed(config.seed)
    try:
        model = LanguageModel(config.model)
    except (TypeError, ValueError) as e:  # a mixer's constructor refusing an option's value
        raise ConfigError(f"model: {e}") from None
    if d.main:  # one process writes the token cache; the others wait and read it
        corpus = _load_corpus(config)
    if d.world > 1:
        dist.barrier()
    if not d.main:
        corpus = _load_corpus(config)
    return model, corpus, state


def _load_corpus(config):
    try:
        return load_corpus(config.data, config.seq_len)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def train(config: TrainConfig) -> dict:
    """Run (or resume) training; returns the final metrics (``val_bpb``, ``step``, ``loss``)."""
    d = _setup_distributed()
    try:
        metrics = _train(config, d)
        if d.world > 1:
            # The group comes down only when every rank is done (rank 0 writes last): a rank that destroyed its
            # group and exited while rank 0 was still saving aborted in gloo's teardown ("terminate called
            # without an active exception") in 5 of 32 two-process CPU runs; with this barrier, 0 of 30. Not in
            # `finally`: after a failure the other ranks may never arrive, and torchrun stops them instead.
            dist.barrier()
        return metrics
    finally:
        if d.world > 1:
            dist.destroy_process_group()


def _train(config: TrainConfig, d: Dist) -> dict:
    validate(config, d.world)
    device = _device(config, d)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        keep_freed_cpu_memory()
    model, corpus, resumed = _prepare(config, d)
    out = Path(config.out_dir)
    if resumed is not None and resumed["step"] == config.steps and not config.eval_num_steps:
        return _finished_already(out, config, d)
    model.to(device)
    optimizer = _optimizer(model, config, device)
    start_step, schedule = 0, [(0, config.steps)]
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        start_step, schedule = resumed["step"], resumed_schedule(resumed, config)
        _set_rng_state(resumed["rng"], device)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / LOG, start_step if resumed is not None else None) if d.main else None
    if d.main and resumed is None:
        (out / LOG).unlink(missing_ok=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if d.world > 1 else model
    step_fn = torch.compile(ddp) if config.compile else ddp
    n_params = sum(p.numel() for p in model.parameters())
    if d.main:
        print(f"seqmix-train: {n_params / 1e6:.2f}M parameters, layers {config.model.layers}, "
              f"data {corpus.name} ({len(corpus.train) / 1e6:.1f}M train / {len(corpus.val) / 1e6:.2f}M val tokens), "
              f"device {device}, {d.world} process(es)" + (f", resuming at step {start_step}" if resumed else ""),
              flush=True)
        print(f"seqmix-train: token cache {corpus.directory} (set the location with SEQMIX_CACHE)", flush=True)
        if resumed is not None and schedule[-1][0] == start_step:  # a segment starts here: extended just now
            print(f"seqmix-train: extending the run to {config.steps} steps: the learning rate, "
                  f"{lr_at(config, start_step, schedule):.3g} at step {start_step}, now reaches "
                  f"min_lr={config.min_lr:g} at step {config.steps} (cosine)", flush=True)
        print("\n".join(backend_report(model, corpus, config, device)), flush=True)
    bar = _progress(config, d, start_step)
    tokens_per_step = config.batch_size * config.seq_len
    pending, t_last, step_last, metrics = [], time.perf_counter(), start_step, {}
    for step in range(start_step, config.steps):
        lr = lr_at(config, step, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_aux = torch.zeros((), device=device), {}
        depth = _depth(model, config, step)
        for micro in range(config.grad_accum):
            x, y = _batch(corpus, config, step, micro, d, device)
            sync = micro == config.grad_accum - 1 or d.world == 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                loss, aux, aux_metrics = _losses(step_fn, model, x, y, config, device, depth)
                ((loss + aux) / config.grad_accum).backward()
            step_loss += loss.detach() / config.grad_accum
            if aux_metrics:
                aux_metrics["aux_loss"] = aux.detach()
            for name, value in aux_metrics.items():
                step_aux[name] = step_aux.get(name, 0.0) + value.float() / config.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append((step_loss, grad_norm, step_aux, depth))
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            losses = torch.stack([p[0] for p in pending])
            aux_means = {name: torch.stack([p[2][name] for p in pending]).mean() for name in pending[-1][2]}
            if d.world > 1:
                dist.all_reduce(losses, op=dist.ReduceOp.AVG)
                for value in aux_means.values():
                    dist.all_reduce(value, op=dist.ReduceOp.AVG)
            now = time.perf_counter()
            metrics = {"step": done, "loss": losses.mean().item(), "lr": lr, "grad_norm": pending[-1][1].item(),
                       "tokens": done * tokens_per_step,
                       "tokens_per_s": (done - step_last) * tokens_per_step / (now - t_last),
                       **{name: value.item() for name, value in aux_means.items()}}
            if depth:  # this step's r and k, and the mean r since the last entry
                metrics.update(depth, num_steps_mean=sum(p[3]["num_steps"] for p in pending) / len(pending))
            pending, t_last, step_last = [], now, done
            if d.main:
                log.write(metrics)
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if done % config.eval_every == 0 or done == config.steps:
            bpb = evaluate(model, corpus, config, d, device)
            metrics = {**metrics, "step": done, "val_bpb": bpb, "val_loss": bpb * math.log(2)}
            if d.main:
                log.write({"step": done, "val_bpb": bpb, "val_loss": bpb * math.log(2)})
                _say(bar, f"step {done}: validation {bpb:.4f} bits per byte")
            t_last = time.perf_counter()  # evaluation time is not training throughput
        if d.main and (done % config.save_every == 0 or done == config.steps):
            save_checkpoint(out / CHECKPOINT, model, optimizer, done, config, device, schedule)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if config.eval_num_steps:
        metrics = {**metrics, **_evaluate_depths(model, corpus, config, d, device, log, bar)}
    if d.main:
        model.save_pretrained(out / MODEL_DIR)
        entries = log.entries()
        plot_losses(entries, out / PLOT)
        final = [e for e in entries if "val_bpb" in e]
        if final:
            print(f"seqmix-train: done, step {final[-1]['step']}: validation {final[-1]['val_bpb']:.4f} bits per byte; "
                  f"model in {out / MODEL_DIR}, log in {out / LOG}, plot in {out / PLOT}", flush=True)
    return metrics


def _finished_already(out: Path, config: TrainConfig, d: Dist) -> dict:
    """A resume with nothing to train: say so and return the run's last metrics; nothing is written."""
    entries = RunLog(out / LOG, None).entries()
    last = next((e for e in reversed(entries) if "val_bpb" in e), {})
    if d.main:
        print(f"seqmix-train: the run in {out} finished at step {config.steps} (steps={config.steps}); nothing to "
              f"train. Resume with --steps N, N > {config.steps}, to train it further.", flush=True)
    return {**last, "step": config.steps}


def backend_report(model: LanguageModel, corpus: Corpus, config: TrainConfig, device: torch.device) -> list[str]:
    """Per layer, the backend each of its ops takes on ``device`` and why (seqmix.kernels.backend.recording):
    one evaluation forward of one validation window under the run's autocast, the random generators left
    as they were (a resumed run draws what the uninterrupted one drew)."""
    from seqmix.kernels.backend import recording

    x, _ = corpus.batch("val", torch.zeros(1, dtype=torch.int64), config.seq_len)
    starts = []  # (layer, index of its first choice)
    hooks = [block.register_forward_pre_hook(lambda *_, i=i: starts.append((i, len(choices))))
             for i, block in enumerate(model.blocks)]
    try:
        with recording() as choices, torch.no_grad(), _autocast(config, device), \
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model.eval()
            model(x.to(device))
    finally:
        model.train()
        for hook in hooks:
            hook.remove()
    lines = [f"seqmix-train: backends on {device} (per layer: op -> backend (why)):"]
    for (i, first), (_, after) in zip(starts, [*starts[1:], (None, len(choices))]):
        by_backend: dict[tuple[str, str], dict[str, int]] = {}
        for choice in choices[first:after]:
            ops = by_backend.setdefault((choice.backend, choice.reason), {})
            ops[choice.op] = ops.get(choice.op, 0) + 1
        said = "; ".join(", ".join(op + (f" x{n}" if n > 1 else "") for op, n in ops.items()) + f" -> {name} ({why})"
                         for (name, why), ops in by_backend.items())
        lines.append(f"  layer {i} {config.model.layers[i]}: {said or 'PyTorch operations only'}")
    return lines


def _evaluate_depths(model, corpus, config: TrainConfig, d: Dist, device, log, bar) -> dict:
    """Validation bits per byte at each depth of ``eval_num_steps``, logged as one entry."""
    by_depth, seconds = {}, {}
    for r in config.eval_num_steps:
        start = time.perf_counter()
        by_depth[str(r)] = evaluate(model, corpus, config, d, device, num_steps=r)
        seconds[str(r)] = time.perf_counter() - start
    entry = {"step": config.steps, "val_bpb_by_num_steps": by_depth, "eval_seconds_by_num_steps": seconds}
    if d.main:
        log.write(entry)
        _say(bar, "validation bits per byte by depth r: " + ", ".join(f"r={r}: {v:.4f}" for r, v in by_depth.items()))
    return entry


def _progress(config: TrainConfig, d: Dist, start_step: int):
    if not (config.progress and d.main):
        return None
    from tqdm import tqdm

    return tqdm(total=config.steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)


def _say(bar, message: str) -> None:
    if bar is not None:
        bar.write(message)
    else:
        print(message, flush=True)


def main(argv=None) -> None:
    """``seqmix-train``: a bad config or a run that cannot start exits with status 2 and
    ``seqmix-train: error: ...`` (argparse's ``parser.error``), before anything is written."""
    parser = build_parser()
    try:
        train(parse_args(argv, parser))
    except ConfigError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
