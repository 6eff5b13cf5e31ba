"""Dynamic token pooling: the segment ops against the dense einsum form, and the hourglass LM against a full-length one.

    python -m benchmarks.bench_pooling op   [--json out.json]     # pool + upsample, fwd and fwd+bwd
    python -m benchmarks.bench_pooling lm   [--steps 100] [--hidden-size 64] [--seq-len 256] [--modes ...]

``op``: ``segment_pool`` followed by ``segment_upsample`` (the layer's pair) at B8 T2048 D1024 with 20%
boundaries (``--size`` changes it), each seqmix backend against the dense form that builds [B, T, S]
matrices from cumulative sums of the boundaries (the published implementation's approach, written here
from its description): median ms, same process, same inputs, fresh random ones. On the CPU the Triton
backend is left out (the interpreter is no timing) and the default size is smaller.

``lm``: the hourglass (2 full-length layers, the hourglass with 8 shortened layers, 2 full-length layers)
against a 12-layer full-length model, both attention, trained with the bundled trainer on the bundled corpus
for the same steps and batch: validation bits per byte, and tokens/s from training steps of all models
taken in turn (round robin, so a shared machine's load falls on all alike), every boundary mode. Prints a
table and the exact configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import floor_ms
from seqmix.kernels import segment_pool, segment_upsample

MODES = ("fixed", "whitespace", "gumbel", "entropy", "hnet")


# --- the op ----------------------------------------------------------------------------------------


def dense_pool_upsample(x, b, null):
    """Pool and upsample with [B, T, S] matrices built from cumulative sums of the boundaries, as the
    published hourglass code does: the weights equal 1 on a token's segment and carry the gradient of the
    cumulative sum; the segment count is read back to size them. The counts and weights are computed in
    float32 at least (bfloat16 counts only to 256) and cast to x's dtype for the einsums."""
    B, T, D = x.shape
    S = int(b.sum(1).max().item())
    count_dtype = torch.promote_types(b.dtype, torch.float32)
    b = b.to(count_dtype)
    slots = torch.arange(S + 1, device=x.device, dtype=count_dtype)
    before = (b.cumsum(1) - b)[..., None]  # [B, T, 1] boundaries before each token
    offset = slots[:S] - before  # 0 where token t is in segment s
    w = torch.where(offset == 0, 1 - offset, torch.zeros_like(offset))
    pooled = torch.einsum("btd,bts->bsd", x, (w / (w.sum(1, keepdim=True) + 1e-9)).to(x.dtype))
    y = torch.cat([null.expand(B, 1, D), pooled], 1)
    offset = slots - b.cumsum(1)[..., None]  # 0 where token t reads row s
    w = torch.where(offset == 0, 1 - offset, torch.zeros_like(offset))
    return torch.einsum("bsd,bts->btd", y, (w / (w.sum(2, keepdim=True) + 1e-9)).to(x.dtype))


def seqmix_pool_upsample(backend):
    def run(x, b, null):
        pooled = segment_pool(x, b, backend=backend)
        y = torch.cat([null.expand(x.shape[0], 1, -1), pooled], 1)
        return segment_upsample(y, b, backend=backend)

    return run


def impls(backends) -> dict:
    """seqmix's pool + upsample per backend, and the dense einsum form (``dense``)."""
    out = {b: seqmix_pool_upsample(b) for b in backends}
    out["dense"] = dense_pool_upsample
    return out


def make_inputs(B, T, D, rate, dtype, requires_grad, device="cuda", generator=None):
    """x [B, T, D], boundaries [B, T] (1 with probability ``rate``, else 0, in x's dtype, as the layer's
    straight-through boundaries are) and the null row [1, 1, D] that upsampling puts before the pooled rows;
    all three get gradients with ``requires_grad``."""
    x = torch.randn(B, T, D, device=device, dtype=dtype, generator=generator)
    b = (torch.rand(B, T, device=device, generator=generator) < rate).to(dtype)
    null = torch.randn(1, 1, D, device=device, dtype=dtype, generator=generator)
    return [t.requires_grad_(requires_grad) for t in (x, b, null)]


def pool_floor_ms(B, T, D, rate, elem_bytes, backward):
    """Bytes moved once, with S = rate * T segment rows per sequence: the forward reads x, writes the pooled
    rows, reads them back as y and writes the output; the backward reads the output's gradient (and y, for the
    boundaries' gradient), writes y's, reads it back as the pooled rows' gradient (and the pooled rows and x,
    for the boundaries' gradient) and writes x's. The boundaries ([B, T]) are a rounding error at D >= 16."""
    token_rows, segment_rows = (5, 6) if backward else (2, 2)
    return floor_ms(B * T * D * elem_bytes * (token_rows + segment_rows * rate))


def _median_ms(fn, inputs, backward, device, reps):
    grad = None

    def call():
        nonlocal grad
        if not backward:
            with torch.no_grad():
                return fn(*inputs)
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)

    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(call, return_mode="median")
    call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_op(args, device) -> list[dict]:
    B, T, D = args.size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fns = impls(["reference", "triton"] if device.type == "cuda" else ["reference"])
    rows = []
    for backward in (False, True):
        g = torch.Generator(device=device).manual_seed(0)
        x, b, null = make_inputs(B, T, D, args.rate, dtype, backward, device, g)
        times = {name: _median_ms(fn, (x, b, null), backward, device, args.reps) for name, fn in fns.items()}
        ref_out = seqmix_pool_upsample("reference")(x.float(), b.float(), null.float())
        for name, ms in times.items():
            out = fns[name](x, b, null)
            err = ((out.float() - ref_out).norm() / ref_out.norm()).item()
            rows.append({"impl": name, "B": B, "T": T, "D": D, "dtype": str(dtype).split(".")[1],
                         "mode": "fwd+bwd" if backward else "fwd", "ms": ms, "dense_over_this": times["dense"] / ms,
                         "out_rel_err_vs_reference": err})
    print(f"\nsegment_pool + segment_upsample, B{B} T{T} D{D}, {args.rate:.0%} boundaries, {rows[0]['dtype']}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    print(f"{'impl':<10} {'mode':<8} {'ms':>9} {'dense/this':>10} {'out err':>9}")
    for r in rows:
        print(f"{r['impl']:<10} {r['mode']:<8} {r['ms']:>9.3f} {r['dense_over_this']:>9.2f}x "
              f"{r['out_rel_err_vs_reference']:>9.1e}")
    return rows


# --- the language models -----------------------------------------------------------------------------


def lm_configs(args) -> dict[str, dict]:
    """The full-length baseline and one hourglass per boundary mode, same width, heads and depth."""
    inner = {"layers": ["attention*8"], "prior": args.prior, "stride": round(1 / args.prior)}
    models = {"full-length x12": {"layers": ["attention*12"]}}
    for mode in args.modes:
        models[f"hourglass {mode}"] = {"layers": ["attention*2", "hourglass", "attention*2"],
                                       "mixer_options": {"hourglass": {**inner, "boundary": mode}}}
    return models


def interleaved_step_ms(models: dict[str, dict], args, device) -> dict[str, float]:
    """Median training-step time of each model, the models' steps taken in turn (round robin), so load from
    other processes on a shared machine falls on all of them alike. Random byte tokens, the trainer's loss
    (LM + auxiliary) and optimizer."""
    from seqmix import train as trainer
    from seqmix.archs.lm import LanguageModel

    built = {}
    for name, model in models.items():
        torch.manual_seed(0)
        config = trainer.config_from_dict({"model": {"hidden_size": args.hidden_size, "num_heads": args.num_heads,
                                                     **model}, "autocast": "none"})
        lm = LanguageModel(config.model).to(device)
        built[name] = (lm, trainer._optimizer(lm, config, device), config)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=g).to(device)
    times = {name: [] for name in built}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for rep in range(args.timing_steps + 1):
        for name, (lm, optimizer, config) in built.items():
            sync()
            start = time.perf_counter()
            loss, aux, _ = trainer._losses(lm, lm, tokens[:, :-1], tokens[:, 1:], config, device)
            (loss + aux).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if rep:  # the first round warms up
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_lm(args, device) -> list[dict]:
    from seqmix import train as trainer

    rows = []
    step_ms = interleaved_step_ms(lm_configs(args), args, device)
    for name, model in lm_configs(args).items():
        with tempfile.TemporaryDirectory() as out:
            config = trainer.config_from_dict({
                "model": {"hidden_size": args.hidden_size, "num_heads": args.num_heads, **model},
                "out_dir": out, "seq_len": args.seq_len, "batch_size": args.batch, "steps": args.steps,
                "lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": max(1, args.steps // 10),
                "eval_every": args.steps, "eval_tokens": args.eval_tokens, "save_every": args.steps,
                "log_every": max(1, args.steps // 10), "progress": False, "device": str(device),
            })
            start = time.perf_counter()
            metrics = trainer.train(config)
            seconds = time.perf_counter() - start
            log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
        rates = [e["tokens_per_s"] for e in log if "tokens_per_s" in e][1:] or [metrics["tokens_per_s"]]
        train = [e for e in log if "loss" in e][-1]
        rows.append({
            "model": name, "tokens_per_s": args.batch * args.seq_len / step_ms[name] * 1e3,
            "tokens_per_s_in_training_run": statistics.median(rates), "val_bpb": metrics["val_bpb"],
            "final_train_loss": train["loss"], "boundary_rate": train.get("layer2.boundary_rate"),
            "mean_segment_length": train.get("layer2.mean_segment_length"), "seconds": seconds,
        })
    base = rows[0]["tokens_per_s"]
    print(f"\nLM comparison: hidden {args.hidden_size}, {args.num_heads} heads, seq_len {args.seq_len}, batch "
          f"{args.batch}, {args.steps} steps, lr {args.lr}, prior {args.prior}, bundled corpus, "
          f"{'GPU ' + torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU, {args.threads} thread(s)'}")
    print("tokens/s: median of interleaved training steps (models in turn); run tok/s: the training run's own "
          "log (noisy on a shared machine); rate, seg len: the hourglass's last logged boundary rate and mean "
          "segment length; s: wall time of the training run")
    print(f"{'model':<22} {'tokens/s':>9} {'vs full':>8} {'run tok/s':>9} {'val bpb':>8} {'rate':>6} {'seg len':>7} "
          f"{'s':>6}")
    for r in rows:
        rate = f"{r['boundary_rate']:.3f}" if r["boundary_rate"] is not None else "-"
        seg = f"{r['mean_segment_length']:.2f}" if r["mean_segment_length"] is not None else "-"
        print(f"{r['model']:<22} {r['tokens_per_s']:>9.0f} {r['tokens_per_s'] / base:>7.2f}x "
              f"{r['tokens_per_s_in_training_run']:>9.0f} {r['val_bpb']:>8.4f} {rate:>6} {seg:>7} {r['seconds']:>6.0f}")
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["op", "lm", "all"])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, nargs=3, metavar=("B", "T", "D"), help="op shape (default B8 T2048 D1024; "
                        "B8 T512 D256 on the CPU)")
    parser.add_argument("--rate", type=float, default=0.2, help="boundary rate of the op benchmark")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions on the CPU")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-heads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--prior", type=float, default=0.2)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--timing-steps", type=int, default=5, help="interleaved timed steps per model")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (on a shared machine more "
                        "threads made every gather wait on the thread pool: 40x slower index ops)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.size is None:
        args.size = (8, 2048, 1024) if device.type == "cuda" else (8, 512, 256)
    results = {}
    if args.part in ("op", "all"):
        results["op"] = bench_op(args, device)
    if args.part in ("lm", "all"):
        results["lm"] = bench_lm(args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
