"""Equal-budget language models: the same byte-level LM with different mixers, trained alike.

    python -m seqmix.bench.lm --preset cpu                     # minutes on 2 CPU cores
    python -m seqmix.bench.lm --preset gpu                     # the gpu-50m recipe (seqmix/configs/gpu-50m.yaml)
    python -m seqmix.bench.lm --configs "[attention*4]" "[deltanet*3, attention]" --set steps=400

Every config gets the same trainer settings (seqmix.train: data, data order, steps, schedule,
seeds) and the same hidden size, heads, MLP and number of layers; only the mixers differ, so the
parameter counts differ by what the mixers hold (the table reports them). Each run trains in a
process of its own (its peak memory is its own), in ``<out>/<config>-seed<seed>/``, and is
appended to ``<out>/results.jsonl``: a second call with the same ``--out`` skips finished runs and
resumes an interrupted one from its checkpoint. Writes ``<out>/lm.md`` (validation bits per byte,
tokens/s, peak memory) and ``<out>/lm.png`` (validation bits per byte against steps and against
training wall time). See docs/design.md, "Model-quality benchmarks".
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import time
from pathlib import Path

import yaml

from seqmix.bench.results import Results, markdown_table, progress, pyplot, save_figure, write_report

CPU_CONFIGS = ["[attention*4]", "[deltanet*4]", "[deltanet*3, attention]"]
GPU_CONFIGS = ["[attention*16]", "[deltanet*16]", "[" + ", ".join(["deltanet*3, attention"] * 4) + "]",
               "[gated_deltanet*16]"]
PRESETS = {
    # seqmix/configs/tiny.yaml's model and schedule with 4 layers: ~1-2 minutes a run on 2 loaded cores.
    "cpu": (CPU_CONFIGS, {"model": {"hidden_size": 128, "num_heads": 2}, "seq_len": 128, "batch_size": 16,
                          "steps": 200, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20, "eval_every": 25,
                          "eval_tokens": 16384, "save_every": 50, "log_every": 5}),
    "gpu": (GPU_CONFIGS, "gpu-50m"),
}


def parse_layers(text: str) -> list[str]:
    """A layer config as the trainer's ``--model.layers`` takes it, e.g. "[deltanet*3, attention]"."""
    layers = yaml.safe_load(text)
    if not isinstance(layers, list) or not layers or not all(isinstance(v, str) for v in layers):
        raise ValueError(f"a layer config must be a YAML list of mixer names, e.g. \"[deltanet*3, attention]\"; "
                         f"got {text!r}")
    return layers


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def base_values(preset: str) -> tuple[list[str], dict]:
    """The preset's layer configs and trainer settings (a nested dict as :func:`seqmix.train.config_from_dict` takes)."""
    configs, base = PRESETS[preset]
    if isinstance(base, str):
        from seqmix.train import CONFIG_DIR

        base = yaml.safe_load((CONFIG_DIR / f"{base}.yaml").read_text())
    return list(configs), json.loads(json.dumps(base))


def apply_override(values: dict, assignment: str) -> None:
    """``key=value`` (value read as YAML; ``model.<field>`` for the model) into the nested values."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set takes key=value, got {assignment!r}")
    *parents, name = key.split(".")
    target = values
    for parent in parents:
        target = target.setdefault(parent, {})
    value = yaml.safe_load(raw)
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    target[name] = value


def count_parameters(model_values: dict) -> int:
    from seqmix.archs.lm import LanguageModel, LMConfig

    return sum(p.numel() for p in LanguageModel(LMConfig(**model_values)).parameters())


def _train_child(values: dict, threads: int | None = None) -> dict:
    """Runs in a process of its own: trains, returns the final metrics and this process's peak memory."""
    import resource

    import torch

    from seqmix.train import config_from_dict, train

    if threads:
        torch.set_num_threads(threads)
    config = config_from_dict(values)
    cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    metrics = train(config)
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated(), "cuda allocated"
    else:  # Linux reports ru_maxrss in KiB
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process RSS"
    return {**metrics, "peak_memory": peak, "memory_kind": kind}


def curves(log_path: Path) -> dict:
    """From the trainer's log.jsonl: validation bpb by step and by training wall time (seconds of the logged
    intervals, evaluation excluded), and the mean throughput."""
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    wall_at, seconds, last_tokens = {0: 0.0}, 0.0, 0
    for e in entries:
        if "tokens_per_s" in e:
            seconds += (e["tokens"] - last_tokens) / e["tokens_per_s"]
            last_tokens = e["tokens"]
            wall_at[e["step"]] = seconds
    val = [(e["step"], e["val_bpb"]) for e in entries if "val_bpb" in e]
    return {"val_steps": [s for s, _ in val], "val_bpb_curve": [b for _, b in val],
            "val_wall": [wall_at.get(s, seconds) for s, _ in val], "train_seconds": seconds,
            "tokens_per_s": last_tokens / seconds if seconds else 0.0}


def run_config(layers_text: str, values: dict, seed: int, out: Path, results: Results,
               threads: int | None = None) -> dict:
    """Train one layer config with one seed (skipped when ``results`` has it; resumed from its checkpoint
    when a previous call was interrupted). Returns its results row."""
    run_values = json.loads(json.dumps(values))
    run_values.setdefault("model", {})["layers"] = parse_layers(layers_text)
    run_dir = out / f"{slug(layers_text)}-seed{seed}"
    run_values.update(seed=seed, out_dir=str(run_dir), resume=(run_dir / "checkpoint.pt").is_file())
    key = json.dumps({k: v for k, v in run_values.items() if k not in ("out_dir", "resume", "progress")},
                     sort_keys=True)
    if results.done(key):
        return results.rows[key]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        metrics = pool.apply(_train_child, (run_values, threads))
    row = {"key": key, "config": layers_text, "seed": seed, "layers": run_values["model"]["layers"],
           "params": count_parameters(run_values["model"]), "val_bpb": metrics["val_bpb"],
           "steps": metrics["step"], "peak_memory": metrics["peak_memory"], "memory_kind": metrics["memory_kind"],
           "seconds": time.perf_counter() - start, **curves(run_dir / "log.jsonl")}
    results.add(row)
    return row


def _mean(rows: list[dict], name: str) -> float:
    return sum(r[name] for r in rows) / len(rows)


def table(rows: list[dict]) -> str:
    """One line per config: parameters, validation bpb (mean over seeds), tokens/s, peak memory, training time."""
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        out.append([config, f"{mine[0]['params'] / 1e6:.3f}M", len(mine), f"{_mean(mine, 'val_bpb'):.4f}",
                    f"{_mean(mine, 'tokens_per_s'):.0f}", f"{max(r['peak_memory'] for r in mine) / 2**20:.0f}",
                    f"{_mean(mine, 'train_seconds'):.0f}"])
    kind = rows[0]["memory_kind"] if rows else ""
    return markdown_table(["layers", "params", "seeds", "val bpb", "tokens/s", f"peak MiB ({kind})", "train s"],
                          out)


def plot(rows: list[dict], path: str | Path) -> None:
    """Validation bits per byte against step (left) and training wall time (right), one line per config
    (the first seed's run)."""
    plt = pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for config in dict.fromkeys(r["config"] for r in rows):
        r = next(r for r in rows if r["config"] == config)
        by_step.plot(r["val_steps"], r["val_bpb_curve"], "o-", ms=3, label=config)
        by_time.plot(r["val_wall"], r["val_bpb_curve"], "o-", ms=3, label=config)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training wall time (s)")
    by_step.set_ylabel("validation bits per byte")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=7)
    save_figure(fig, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="seqmix-bench lm", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--configs", nargs="+", help='layer configs, e.g. "[attention*4]" "[deltanet*3, attention]"')
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, each config trained once per seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a trainer setting (seqmix.train.TrainConfig; model.<field> for the model), e.g. steps=400")
    parser.add_argument("--data", help="the corpus (default: the Python standard library's text)")
    parser.add_argument("--out", help="results directory (default runs/lm-<preset>)")
    parser.add_argument("--threads", type=int, help="torch CPU threads of each run (default: torch's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    configs, values = base_values(args.preset)
    configs = args.configs or configs
    try:
        for text in configs:
            parse_layers(text)
        for assignment in args.set:
            apply_override(values, assignment)
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as e:
        parser.error(str(e))
    if args.data:
        values["data"] = args.data
    values["progress"] = False
    return configs, values, seeds, Path(args.out or f"runs/lm-{args.preset}"), args


def main(argv=None) -> None:
    configs, values, seeds, out, args = parse_args(argv)
    results = Results(out / "results.jsonl")
    start = time.perf_counter()
    bar = progress(len(configs) * len(seeds), "lm", not args.no_progress)
    rows = []
    for seed in seeds:
        for text in configs:
            bar.set_postfix_str(f"{text} seed {seed}")
            rows.append(run_config(text, values, seed, out, results, args.threads))
            bar.update(1)
    bar.close()
    write_report(rows, out, "lm", table, plot, start)


if __name__ == "__main__":
    main()
