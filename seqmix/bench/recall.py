"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology") for every registered mixer.

    python -m seqmix.bench.recall --preset cpu                 # minutes on 2 CPU cores
    python -m seqmix.bench.recall --preset zoology --device cuda
    python -m seqmix.bench.recall --mixers attention,deltanet --widths 64,128 --seq-kv 64:8 --lrs 1e-3,3e-3

A sequence holds K key-value pairs, then the K keys again as queries at positions drawn from a power
law (near queries likelier), between random filler tokens; the model must answer each query with its
key's value. The sweep trains Zoology's model (embedding, 2 pre-norm mixer blocks without MLP, final
norm, head) for every mixer x width x (T, K) x learning rate x short conv, stops a run early at the
target test accuracy, and appends each finished run to ``<out>/results.jsonl``: run it again with the
same ``--out`` and finished runs are skipped. It writes ``<out>/recall.md`` (the best accuracy over
the learning rates) and ``<out>/recall.png`` (accuracy against width, one panel per (T, K)).
See docs/design.md, "Model-quality benchmarks".
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqmix.archs import MIXERS, ShortConv, build_mixer
from seqmix.archs.mixer import with_parent_backend
from seqmix.archs.modules import Linear, RMSNorm, ShortConvolution
from seqmix.bench.results import Results, markdown_table, progress, pyplot, save_figure, write_report

IGNORE = -100  # label of the positions that are not queries (F.cross_entropy's ignore_index)


# --- data --------------------------------------------------------------------------------------


def _sample_distinct(rng: np.random.Generator, rows: int, n: int, k: int, log_weights=None,
                     chunk: int = 1024) -> np.ndarray:
    """[rows, k] int64: per row, k distinct indices of [0, n), drawn one after another, each with
    probability proportional to its weight among those not drawn yet (uniform when ``log_weights``
    is None). The Gumbel-top-k trick: the k largest of log w + Gumbel noise, largest first, are such a
    draw (docs/math/mqar.md)."""
    out = np.empty((rows, k), dtype=np.int64)
    for start in range(0, rows, chunk):
        scores = rng.gumbel(size=(min(chunk, rows - start), n))
        if log_weights is not None:
            scores += log_weights
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
        out[start : start + len(top)] = np.take_along_axis(top, order, 1)
    return out


def power_law_log_weights(space: int, power_a: float) -> np.ndarray:
    """log p(g), g = 0..space-1: the distribution of a query's gap (in pairs of tokens) after the
    key-value block, p(g) proportional to a (g + 1)^(a - 1), Zoology's power law."""
    g = np.arange(1, space + 1, dtype=np.float64)
    log_p = math.log(power_a) + (power_a - 1) * np.log(g)
    return log_p - np.logaddexp.reduce(log_p)


def mqar(num_examples: int, vocab_size: int, seq_len: int, num_kv_pairs: int, power_a: float = 0.01,
         random_filler: bool = True, seed: int = 0, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR examples with Zoology's semantics: inputs and labels, both [num_examples, seq_len] int64.

    Positions 0..2K-1 hold K pairs (key, value): K distinct keys from [1, V/2), K distinct values
    from [V/2, V). Each key is asked once more, as a query at position 2K + 2g, with the gap g drawn
    from :func:`power_law_log_weights` over g < (T - 2K) / 2 (distinct per example); the label at a
    query's position is its key's value, every other label is -100. Every other position holds a
    filler token, uniform in [0, V) (``random_filler``) or 0. The draw depends on (``seed``,
    ``stream``) alone: the train and test sets are two streams of one seed.
    """
    N, V, T, K = num_examples, vocab_size, seq_len, num_kv_pairs
    if N < 1:
        raise ValueError(f"num_examples must be >= 1, got {N}")
    if K < 1 or 4 * K > T:
        raise ValueError(f"num_kv_pairs={K} must satisfy 1 <= 4 * num_kv_pairs <= seq_len={T}")
    if T % 2:
        raise ValueError(f"seq_len must be even (queries sit at even offsets), got {T}")
    if V // 2 - 1 < K:
        raise ValueError(f"vocab_size={V} leaves {V // 2 - 1} keys, fewer than num_kv_pairs={K}")
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a must be in (0, 1], got {power_a}")
    rng = np.random.default_rng([seed, stream])
    keys = 1 + _sample_distinct(rng, N, V // 2 - 1, K)
    values = V // 2 + _sample_distinct(rng, N, V - V // 2, K)
    space = (T - 2 * K) // 2
    gaps = _sample_distinct(rng, N, space, K, power_law_log_weights(space, power_a))
    inputs = rng.integers(0, V, size=(N, T)) if random_filler else np.zeros((N, T), dtype=np.int64)
    inputs[:, 0 : 2 * K : 2], inputs[:, 1 : 2 * K : 2] = keys, values
    rows, query_pos = np.arange(N)[:, None], 2 * K + 2 * gaps
    inputs[rows, query_pos] = keys
    labels = np.full((N, T), IGNORE, dtype=np.int64)
    labels[rows, query_pos] = values
    return torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(labels)


# --- model -------------------------------------------------------------------------------------


class _SiLUOnly(nn.Module):
    """What a mixer's built-in short conv becomes with the conv off: its activation alone (as DeltaNet's
    ``use_short_conv=False``), with the conv module's call signature."""

    def forward(self, x, state=None, cu_seqlens=None):
        return F.silu(x), state


class _ConvInFront(nn.Module):
    """A depthwise causal conv (width 4, SiLU) on the mixer's input, for mixers that have none of their own."""

    def __init__(self, mixer: nn.Module, hidden_size: int, conv_size: int = 4, backend: str | None = None):
        super().__init__()
        self.conv, self.mixer = ShortConvolution(hidden_size, conv_size, backend=backend), mixer

    def forward(self, x):
        return self.mixer(self.conv(x)[0])[0]


class _Bare(nn.Module):
    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer

    def forward(self, x):
        return self.mixer(x)[0]


def short_conv_kind(name: str) -> str:
    """How ``--short-conv`` reaches mixer ``name``: "flag" (its ``use_short_conv`` argument), "built-in"
    (its own conv module, turned into its activation alone when off), "is-conv" (the mixer is a short
    conv: no variant without one) or "in-front" (a depthwise conv before it when on)."""
    cls = MIXERS[name]
    if "use_short_conv" in inspect.signature(cls).parameters:
        return "flag"
    if issubclass(cls, ShortConv):
        return "is-conv"
    if "conv_size" in inspect.signature(cls).parameters and name.startswith("mamba"):
        return "built-in"
    return "in-front"


def build_recall_mixer(name: str, width: int, short_conv: bool, heads: int | None = None,
                       state_size: int | None = None, options: dict | None = None,
                       backend: str | None = None) -> nn.Module:
    """Mixer ``name`` at ``width`` as a module x [B, T, width] -> y [B, T, width], with or without a short conv.

    ``heads`` goes to constructors that take ``num_heads``, ``state_size`` to those that take ``d_state``
    (the SSMs); naming one for a mixer that has no such knob is an error. ``backend`` goes to the mixer
    and the conv in front (None: automatic).
    """
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered: {sorted(MIXERS)}")
    params = inspect.signature(MIXERS[name]).parameters
    kwargs = {"hidden_size": width, **with_parent_backend(name, backend, options or {})}
    for arg, value, knob in (("num_heads", heads, "heads"), ("d_state", state_size, "state_size")):
        if value is None:
            if arg == "num_heads" and arg in params and "num_heads" not in kwargs:
                kwargs[arg] = 1
            continue
        if arg not in params:
            raise ValueError(f"{knob}={value}: mixer {name!r} has no {arg} argument")
        kwargs[arg] = value
    kind = short_conv_kind(name)
    if kind == "flag":
        kwargs["use_short_conv"] = short_conv
    if kind == "is-conv" and not short_conv:
        raise ValueError(f"mixer {name!r} is a short conv; it has no variant without one")
    mixer = build_mixer(name, **kwargs)
    if kind == "built-in" and not short_conv:
        mixer.conv = _SiLUOnly()
    if kind == "in-front" and short_conv:
        return _ConvInFront(mixer, width, backend=backend)
    return _Bare(mixer)


class RecallModel(nn.Module):
    """Zoology's MQAR model: embedding, ``layers`` pre-norm mixer blocks (no MLP), final norm, head.

    ``loss, correct, count = model(inputs, labels)``: inputs and labels [B, T] int64; the final norm,
    the head and the cross-entropy run only at the labelled positions (labels != -100).
    """

    def __init__(self, vocab_size: int, width: int, mixer: str, short_conv: bool, layers: int = 2,
                 heads: int | None = None, state_size: int | None = None, options: dict | None = None,
                 backend: str | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.norms = nn.ModuleList(RMSNorm(width) for _ in range(layers))
        self.mixers = nn.ModuleList(build_recall_mixer(mixer, width, short_conv, heads, state_size, options, backend)
                                    for _ in range(layers))
        self.norm = RMSNorm(width)
        self.head = Linear(width, vocab_size, bias=False)

    def hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.embed(inputs)
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x))
        return x

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor):
        if inputs.shape != labels.shape:
            raise ValueError(f"inputs {tuple(inputs.shape)} and labels {tuple(labels.shape)} must have one shape")
        keep = labels != IGNORE
        if not keep.any():
            raise ValueError("labels hold no labelled position (all are -100)")
        target = labels[keep]
        logits = self.head(self.norm(self.hidden(inputs)[keep])).float()
        loss = F.cross_entropy(logits, target)
        return loss, (logits.argmax(-1) == target).sum(), target.numel()


# --- one run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecallRun:
    """Everything that decides one run's result; :meth:`key` names it in the results file."""

    mixer: str
    short_conv: bool
    width: int
    seq_len: int
    num_kv_pairs: int
    lr: float
    vocab_size: int
    num_train: int
    num_test: int
    epochs: int
    batch_size: int
    heads: int | None = None
    state_size: int | None = None
    weight_decay: float = 0.1
    target: float = 0.99
    power_a: float = 0.01
    random_filler: bool = True
    seed: int = 0

    def key(self) -> str:
        return "|".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


def lr_schedule(step: int, total: int, warmup: int) -> float:
    """Factor on the peak learning rate: linear warmup, then cosine to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def accuracy(model: RecallModel, inputs, labels, batch_size: int, device) -> float:
    """Share of the labelled positions whose value the model ranks first."""
    model.eval()
    correct = count = 0
    for i in range(0, len(inputs), batch_size):
        _, c, n = model(inputs[i : i + batch_size].to(device), labels[i : i + batch_size].to(device))
        correct, count = correct + int(c), count + n
    model.train()
    return correct / count


def train_recall(run: RecallRun, data: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                 backend: str | None = None) -> dict:
    """Train one run (AdamW, warmup + cosine over ``epochs``, the data reshuffled each epoch by the seed),
    evaluate after each epoch and stop once the test accuracy reaches ``run.target``.
    Returns the results row: the run's fields, ``accuracy`` (best test accuracy), ``curve`` (test
    accuracy per epoch), ``epochs_run``, ``steps``, ``seconds``, ``params`` and ``diverged``."""
    torch.manual_seed(run.seed)
    model = RecallModel(run.vocab_size, run.width, run.mixer, run.short_conv, heads=run.heads,
                        state_size=run.state_size, backend=backend).to(device)
    # The project's one weight-decay rule (docs/design.md, "Weight decay"): what a module marks is not decayed.
    decay = [p for p in model.parameters() if not getattr(p, "no_weight_decay", False)]
    rest = [p for p in model.parameters() if getattr(p, "no_weight_decay", False)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": run.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=run.lr, betas=(0.9, 0.98))
    x, y = data["train_inputs"], data["train_labels"]
    per_epoch = math.ceil(len(x) / run.batch_size)
    total, warmup = run.epochs * per_epoch, max(1, run.epochs * per_epoch // 20)
    curve, step, diverged, start = [], 0, False, time.perf_counter()
    for epoch in range(run.epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(run.seed * 1_000_003 + epoch))
        for i in range(0, len(x), run.batch_size):
            idx = order[i : i + run.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = run.lr * lr_schedule(step, total, warmup)
            loss, _, _ = model(x[idx].to(device), y[idx].to(device))
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        if diverged:
            break
        curve.append(accuracy(model, data["test_inputs"], data["test_labels"], 4 * run.batch_size, device))
        if curve[-1] >= run.target:
            break
    return {"key": run.key(), **dataclasses.asdict(run), "accuracy": max(curve, default=0.0), "curve": curve,
            "epochs_run": len(curve), "steps": step, "seconds": time.perf_counter() - start,
            "params": sum(p.numel() for p in model.parameters()), "diverged": diverged}


# --- the sweep ---------------------------------------------------------------------------------


@dataclass
class Sweep:
    """The grid: every mixer x short conv x width x (T, K) x learning rate."""

    mixers: list[str]
    widths: list[int]
    seq_kv: list[tuple[int, int]]
    lrs: list[float]
    short_conv: list[bool]
    vocab_size: int
    num_train: int
    num_test: int
    epochs: int
    batch_size: dict[int, int]  # by T
    heads: int | None = None
    state_size: int | None = None
    power_a: float = 0.01
    random_filler: bool = True
    target: float = 0.99
    seed: int = 0

    def runs(self) -> list[RecallRun]:
        runs = []
        for (T, K) in self.seq_kv:
            for width in self.widths:
                for mixer in self.mixers:
                    for conv in self.short_conv:
                        if not conv and short_conv_kind(mixer) == "is-conv":
                            continue
                        runs += [RecallRun(mixer, conv, width, T, K, lr, self.vocab_size, self.num_train,
                                           self.num_test, self.epochs, self.batch_size[T], self.heads,
                                           self.state_size, target=self.target, power_a=self.power_a,
                                           random_filler=self.random_filler, seed=self.seed)
                                 for lr in self.lrs]
        return runs


def _batch_sizes(seq_kv, rule) -> dict[int, int]:
    return {T: rule(T) for T, _ in seq_kv}


CPU_MIXERS = ["attention", "deltanet", "gated_deltanet", "gla", "mamba2", "lightconv", "dynamicconv", "shortconv"]
ZOOLOGY_SEQ_KV = [(64, 4), (128, 8), (256, 16)]
PRESETS = {
    # Sized for 2 shared CPU cores (docs/design.md, "Model-quality benchmarks"): 600 steps of 16 sequences
    # per run; MQAR's progress comes with steps more than with examples, and short runs want a high rate.
    "cpu": {"mixers": CPU_MIXERS, "widths": [64], "seq_kv": [(64, 8), (64, 16)], "lrs": [1e-2],
            "short_conv": [True, False], "vocab_size": 256, "num_train": 2400, "num_test": 500, "epochs": 4,
            "batch_size": _batch_sizes([(64, 8)], lambda T: 16)},
    # Zoology's figure 2: 100K examples, 64 epochs, batch 512 (256 at T = 256), lr grid logspace(-4, -2, 4).
    "zoology": {"mixers": CPU_MIXERS, "widths": [64, 128, 256, 512], "seq_kv": ZOOLOGY_SEQ_KV,
                "lrs": [float(v) for v in np.logspace(-4, -2, 4)], "short_conv": [True, False], "vocab_size": 8192,
                "num_train": 100_000, "num_test": 3_000, "epochs": 64,
                "batch_size": _batch_sizes(ZOOLOGY_SEQ_KV, lambda T: 512 if T <= 128 else 256)},
}


def load_data(vocab_size: int, seq_len: int, num_kv_pairs: int, num_train: int, num_test: int, seed: int = 0,
              power_a: float = 0.01, random_filler: bool = True) -> dict[str, torch.Tensor]:
    """A train set and a test set: two streams of one seed."""
    tr = mqar(num_train, vocab_size, seq_len, num_kv_pairs, power_a, random_filler, seed=seed, stream=0)
    te = mqar(num_test, vocab_size, seq_len, num_kv_pairs, power_a, random_filler, seed=seed, stream=1)
    return {"train_inputs": tr[0], "train_labels": tr[1], "test_inputs": te[0], "test_labels": te[1]}


def run_sweep(sweep: Sweep, results: Results, device="cpu", show_progress: bool = True,
              max_runs: int | None = None, backend: str | None = None) -> list[dict]:
    """Train every run of the grid not in ``results`` yet, appending each as it finishes.
    ``max_runs`` stops after that many new runs (what an interrupted sweep looks like). Returns the
    rows of the whole grid that are done."""
    runs = sweep.runs()
    todo = [r for r in runs if not results.done(r.key())]
    bar = progress(len(runs), "recall", show_progress)
    bar.update(len(runs) - len(todo))
    data = {}
    for i, run in enumerate(todo):
        if max_runs is not None and i >= max_runs:
            break
        shape = (run.seq_len, run.num_kv_pairs)
        if shape not in data:
            data = {shape: load_data(run.vocab_size, *shape, run.num_train, run.num_test, run.seed, run.power_a,
                                     run.random_filler)}
        bar.set_postfix_str(f"{run.mixer} conv={'on' if run.short_conv else 'off'} d={run.width} "
                            f"T={run.seq_len} K={run.num_kv_pairs} lr={run.lr:.0e}")
        results.add(train_recall(run, data[shape], device, backend))
        bar.update(1)
    bar.close()
    return [results.rows[r.key()] for r in runs if results.done(r.key())]


# --- report ------------------------------------------------------------------------------------


def best_over_lr(rows: list[dict]) -> dict[tuple, dict]:
    """The best run (highest accuracy, then fewest steps) of each (mixer, short_conv, width, T, K)."""
    best = {}
    for row in rows:
        group = (row["mixer"], row["short_conv"], row["width"], row["seq_len"], row["num_kv_pairs"])
        if group not in best or (row["accuracy"], -row["steps"]) > (best[group]["accuracy"], -best[group]["steps"]):
            best[group] = row
    return best


def table(rows: list[dict]) -> str:
    """Best test accuracy over the learning rates: one row per (mixer, short conv, width), one column per (T, K);
    each cell is ``accuracy (lr, epochs)``; then the accuracy of every learning rate."""
    best = best_over_lr(rows)
    shapes = sorted({(g[3], g[4]) for g in best})
    lines = sorted({(g[0], g[1], g[2]) for g in best}, key=lambda m: (CPU_MIXERS.index(m[0]) if m[0] in CPU_MIXERS
                                                                      else len(CPU_MIXERS), m[0], not m[1], m[2]))
    out = []
    for mixer, conv, width in lines:
        cells = []
        for T, K in shapes:
            row = best.get((mixer, conv, width, T, K))
            cells.append("" if row is None else f"{row['accuracy']:.3f} ({row['lr']:.0e}, {row['epochs_run']} ep)")
        out.append([mixer, "on" if conv else "off", width, *cells])
    header = ["mixer", "short conv", "width", *[f"T={T} K={K}: acc (lr, epochs)" for T, K in shapes]]
    lrs = sorted({r["lr"] for r in rows})
    every = []
    for mixer, conv, width in lines:
        for T, K in shapes:
            accs = {r["lr"]: r["accuracy"] for r in rows if (r["mixer"], r["short_conv"], r["width"], r["seq_len"],
                                                             r["num_kv_pairs"]) == (mixer, conv, width, T, K)}
            every.append([mixer, "on" if conv else "off", width, f"{T}/{K}",
                          *[f"{accs[lr]:.3f}" if lr in accs else "" for lr in lrs]])
    all_lrs = markdown_table(["mixer", "short conv", "width", "T/K", *[f"lr {lr:.0e}" for lr in lrs]], every)
    return markdown_table(header, out) + "\n\nAccuracy at every learning rate:\n\n" + all_lrs


def plot(rows: list[dict], path: str | Path) -> None:
    """Zoology's figure: best accuracy over the learning rates against width, one panel per (T, K), one line
    per mixer (solid: short conv on, dashed: off). With a single width, bars: one pair per mixer."""
    plt = pyplot()
    best = best_over_lr(rows)
    shapes = sorted({(g[3], g[4]) for g in best})
    mixers = sorted({g[0] for g in best}, key=lambda m: CPU_MIXERS.index(m) if m in CPU_MIXERS else len(CPU_MIXERS))
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.6 * len(shapes) + 1.6, 3.4), squeeze=False, sharey=True)
    if len({g[2] for g in best}) == 1:
        _bars(axes[0], best, shapes, mixers)
    else:
        _lines(plt, axes[0], best, shapes, mixers)
    axes[0][0].set_ylabel("MQAR test accuracy")
    save_figure(fig, path)


def _bars(axes, best, shapes, mixers):
    for ax, (T, K) in zip(axes, shapes):
        for offset, conv, color in ((-0.2, True, "tab:blue"), (0.2, False, "tab:orange")):
            heights = [best[key]["accuracy"] if (key := (m, conv, _best_width(best), T, K)) in best else 0.0
                       for m in mixers]
            ax.bar([i + offset for i in range(len(mixers))], heights, 0.4, color=color,
                   label="short conv" if conv else "no short conv")
        ax.set_xticks(range(len(mixers)), mixers, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"T={T}, K={K}, width {_best_width(best)}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3, axis="y")
    axes[-1].legend(fontsize=7)


def _best_width(best) -> int:
    return next(iter(best))[2]


def _lines(plt, axes, best, shapes, mixers):
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(mixers)}
    for ax, (T, K) in zip(axes, shapes):
        for mixer in mixers:
            for conv in (True, False):
                points = sorted((g[2], r["accuracy"]) for g, r in best.items() if g[:2] == (mixer, conv) and
                                g[3:] == (T, K))
                if points:
                    ax.plot(*zip(*points), "o-" if conv else "x--", color=colors[mixer], alpha=0.9,
                            label=f"{mixer}{'' if conv else ' (no conv)'}")
        ax.set_xscale("log", base=2)
        widths = sorted({g[2] for g in best})
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_title(f"T={T}, K={K}")
        ax.set_xlabel("model width")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    labelled = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    axes[-1].legend(labelled.values(), labelled.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))


# --- command line ------------------------------------------------------------------------------


def _list(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def _seq_kv(text):
    return [tuple(int(v) for v in pair.split(":")) for pair in text.split(",")]


def _on_off(text):
    values = {"on": True, "off": False}
    try:
        return [values[v.strip()] for v in text.split(",")]
    except KeyError:
        raise argparse.ArgumentTypeError(f"--short-conv takes on, off or on,off; got {text!r}") from None


def parse_args(argv=None) -> tuple[Sweep, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="seqmix-bench recall", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--mixers", type=_list(str), help=f"comma-separated (registered: {', '.join(sorted(MIXERS))})")
    parser.add_argument("--widths", type=_list(int))
    parser.add_argument("--seq-kv", type=_seq_kv, help="(T, K) pairs, e.g. 64:4,128:8")
    parser.add_argument("--lrs", type=_list(float), help="learning-rate grid, e.g. 1e-3,3e-3")
    parser.add_argument("--short-conv", type=_on_off, help="on, off or on,off (both)")
    parser.add_argument("--heads", type=int, help="num_heads of the mixers that take it (default 1, as Zoology)")
    parser.add_argument("--state-size", type=int, help="d_state of the mixers that take it (mamba, mamba2)")
    for name in ("vocab-size", "num-train", "num-test", "epochs", "batch-size", "seed"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--target", type=float, help="stop a run at this test accuracy (0.99)")
    parser.add_argument("--power-a", type=float, help="the power law of the query gaps (0.01)")
    parser.add_argument("--no-random-filler", dest="random_filler", action="store_const", const=False,
                        help="filler tokens 0 instead of uniform (Zoology's figure-2 configs)")
    parser.add_argument("--out", default=None, help="results directory (default runs/recall-<preset>)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    parser.add_argument("--backend", help="the mixers' backend (default: automatic), e.g. reference, triton")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    values = dict(PRESETS[args.preset])
    for name in ("mixers", "widths", "seq_kv", "lrs", "short_conv", "heads", "state_size", "vocab_size", "num_train",
                 "num_test", "epochs", "seed", "target", "power_a", "random_filler"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    rule = values["batch_size"]
    default_batch = next(iter(rule.values()))
    values["batch_size"] = {T: args.batch_size or rule.get(T, default_batch) for T, _ in values["seq_kv"]}
    unknown = sorted(set(values["mixers"]) - set(MIXERS))
    if unknown:
        parser.error(f"--mixers: unknown {unknown}; registered: {sorted(MIXERS)}")
    for T, K in values["seq_kv"]:
        if T % 2 or 4 * K > T or K < 1:
            parser.error(f"--seq-kv {T}:{K}: T must be even and 1 <= 4 K <= T")
    args.out = args.out or f"runs/recall-{args.preset}"
    return Sweep(**values), args


def main(argv=None) -> None:
    sweep, args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
    run_sweep(sweep, Results(out / "results.jsonl"), device, show_progress=not args.no_progress, backend=args.backend)
    # The report covers every run in the file: sweeps split over processes (e.g. by --mixers) share one --out.
    rows = list(Results(out / "results.jsonl").rows.values())
    write_report(rows, out, "recall", table, plot, start)


if __name__ == "__main__":
    main()
