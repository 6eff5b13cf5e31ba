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
from ``checkpoint.pt`` and gives, step for step, the run that was not interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqmix.archs import MIXERS
from seqmix.archs.lm import LanguageModel, LMConfig
from seqmix.data import VOCAB_SIZE, Corpus, load_corpus

CONFIG_DIR = Path(__file__).parent / "configs"
CHECKPOINT, LOG, PLOT, MODEL_DIR = "checkpoint.pt", "log.jsonl", "loss.png", "model"
# Fields that change what a run computes; a checkpoint resumes only under the same values.
_PRESENTATION_FIELDS = {"progress", "log_every", "eval_every", "save_every", "compile", "resume", "out_dir",
                        "eval_num_steps"}


class ConfigError(ValueError):
    """A run that cannot start: reported before anything is trained or written."""


@dataclass
class TrainConfig:
    model: LMConfig = field(default_factory=LMConfig)
    data: str | None = None  # None: the Python standard library's text; else a file, a directory or a dataset name
    out_dir: str = "runs/seqmix"
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step, all processes and accumulation steps together
    grad_accum: int = 1
    steps: int = 200
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 65536
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto: cuda when available (cuda:LOCAL_RANK under torchrun), else cpu
    autocast: str = "auto"  # auto: bf16 on GPU, none on CPU; or "bf16" / "fp16" / "none"
    compile: bool = False
    # recurrent_depth models: validation bits per byte at each of these depths r, after the last step
    # (also on a --resume of a finished run, which then only evaluates).
    eval_num_steps: list[int] = field(default_factory=list)
    progress: bool = True
    resume: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- configuration -----------------------------------------------------------------------------


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from nested plain values; unknown keys are errors."""
    values = dict(values)
    model = values.pop("model", {}) or {}
    for cls, given, where in ((TrainConfig, values, ""), (LMConfig, model, "model.")):
        unknown = sorted(set(given) - set(_fields(cls)) - {"model"})
        if unknown:
            raise ConfigError(f"unknown config key(s) {[where + k for k in unknown]}")
    try:
        return TrainConfig(model=LMConfig(**model), **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config: {e}") from None


def _read_config_file(name: str) -> dict:
    path = Path(name)
    if not path.exists() and not path.suffix:
        path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        bundled = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"--config {name!r}: no such file (bundled configs: {bundled})")
    import yaml

    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ConfigError(f"--config {name!r}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def parse_args(argv=None) -> TrainConfig:
    import yaml

    parser = argparse.ArgumentParser(prog="seqmix-train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", help="a YAML/JSON file, or the name of a bundled config (tiny, gpu-50m)")
    flags = {}
    for prefix, cls in (("", TrainConfig), ("model.", LMConfig)):
        for name in _fields(cls):
            if name in ("model", "resume"):
                continue
            flag = "--" + prefix + name.replace("_", "-")
            dest = prefix.replace(".", "__") + name
            parser.add_argument(flag, dest=dest, type=yaml.safe_load, metavar="VALUE")
            flags[dest] = (prefix, name)
    parser.add_argument("--resume", action="store_true", help=f"continue the run in --out-dir from its {CHECKPOINT}")
    args = parser.parse_args(argv)
    values = _read_config_file(args.config) if args.config else {}
    values.setdefault("model", {})
    for dest, (prefix, name) in flags.items():
        value = getattr(args, dest)
        if value is not None:
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
    if not 0 <= config.min_lr <= config.lr:
        raise ConfigError(f"need 0 <= min_lr <= lr, got min_lr={config.min_lr}, lr={config.lr}")
    if config.autocast not in ("auto", "bf16", "fp16", "none"):
        raise ConfigError(f"autocast must be auto, bf16, fp16 or none, got {config.autocast!r}")
    if config.warmup_steps < 0 or config.grad_clip < 0:
        raise ConfigError("warmup_steps and grad_clip must be >= 0")
    steps = config.eval_num_steps
    if not isinstance(steps, list) or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in steps):
        raise ConfigError(f"eval_num_steps must be a list of integers >= 1, got {steps!r}")
    if steps and not any(getattr(MIXERS[name], "takes_steps", False) for name in config.model.layers):
        raise ConfigError(f"eval_num_steps is given but no layer iterates (layers {config.model.layers})")


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr`` at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


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
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             fused=device.type == "cuda")


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


def save_checkpoint(path: Path, model, optimizer, step: int, config: TrainConfig, device) -> None:
    """Write the checkpoint to a temporary file, flush it to disk, then rename it over ``path``:
    a process killed mid-save leaves the previous checkpoint as it was."""
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
        "config": config.to_dict(), "rng": _rng_state(device),
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
    return state


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
    """Train loss (nats per token) and validation loss (nats per byte) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in entries if "val_loss" in e]
    for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    if val:
        ax.set_title(f"final validation: {val[-1][1] / math.log(2):.3f} bits per byte")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _prepare(config: TrainConfig, d: Dist):
    """All checks and loading that can fail, before any training step or write."""
    validate(config, d.world)
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
    except ValueError as e:
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
    device = _device(config, d)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model, corpus, resumed = _prepare(config, d)
    model.to(device)
    optimizer = _optimizer(model, config, device)
    start_step = 0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        start_step = resumed["step"]
        _set_rng_state(resumed["rng"], device)
    out = Path(config.out_dir)
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
    bar = _progress(config, d, start_step)
    tokens_per_step = config.batch_size * config.seq_len
    pending, t_last, step_last, metrics = [], time.perf_counter(), start_step, {}
    for step in range(start_step, config.steps):
        lr = lr_at(config, step)
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
            save_checkpoint(out / CHECKPOINT, model, optimizer, done, config, device)
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
    try:
        train(parse_args(argv))
    except ConfigError as e:
        print(f"seqmix-train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
