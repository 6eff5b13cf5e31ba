"""Training throughput of whole LMs: the same ~50M-parameter model with DeltaNet and with attention.

    python -m benchmarks.bench_train                 # T=2048, B=8, hidden 512, 16 layers, bf16 autocast
    python -m benchmarks.bench_train --layers deltanet attention "deltanet*3,attention" --seq-len 4096

Each model trains on the same random tokens (seeded, never zeros) with the trainer's own step
(fused AdamW, bf16 autocast, gradient clipping); the table gives the median step time over
``--steps`` after ``--warmup`` steps, tokens/s, peak memory, and tokens/s relative to the first
model (attention by default), all measured in this one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from seqmix.archs.lm import LanguageModel, LMConfig
from seqmix.train import TrainConfig, _loss, _optimizer


def train_step_ms(layers: list[str], args, device) -> dict:
    torch.manual_seed(0)
    model_config = LMConfig(vocab_size=320, hidden_size=args.hidden_size, num_heads=args.num_heads, layers=layers)
    model = LanguageModel(model_config).to(device)
    config = TrainConfig(model=model_config, autocast="bf16" if device.type == "cuda" else "none")
    optimizer = _optimizer(model, config, device)
    tokens = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=device,
                           generator=torch.Generator(device=device).manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        loss = _loss(model, x, y, config, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    return {
        "layers": ",".join(layers), "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": args.batch, "seq_len": args.seq_len, "step_ms": ms,
        "tokens_per_s": args.batch * args.seq_len / ms * 1e3, "loss": loss.item(),
        "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=["attention*16", "deltanet*16"],
                        help="one model per entry: comma-separated layers, 'name*n' repeats")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke test; no timing claims)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("the training benchmark needs a CUDA GPU (or --cpu for a smoke run)")
    device = torch.device("cpu" if args.cpu else "cuda")
    rows = [train_step_ms(entry.split(","), args, device) for entry in args.layers]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\nLM training step, {name}, B={args.batch} T={args.seq_len} hidden {args.hidden_size}; "
          f"'vs first': tokens/s relative to {rows[0]['layers']}")
    print(f"{'layers':<28} {'params':>7} {'step ms':>9} {'tokens/s':>10} {'vs first':>9} {'peak GiB':>9}")
    for r in rows:
        peak = f"{r['peak_GiB']:.1f}" if r["peak_GiB"] is not None else "-"
        print(f"{r['layers']:<28} {r['params_M']:>6.1f}M {r['step_ms']:>9.1f} {r['tokens_per_s']:>10.0f} "
              f"{r['tokens_per_s'] / rows[0]['tokens_per_s']:>8.2f}x {peak:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
