"""Decoding speed of whole LMs at B=1: ms per token, eager and as a replayed CUDA graph.

    python -m benchmarks.bench_decode                    # the ~50M models of bench_train, prompt 512, 64 tokens
    python -m benchmarks.bench_decode --layers deltanet*16 --prompt 128 --tokens 32
    python -m benchmarks.bench_decode --generate         # every mixer, the tiny LM, on the CPU (below)

Each model prefills a random prompt in one call, then decodes greedily one
token per call with its state, under bf16 autocast as it trains. The eager
time is the median over ``--tokens`` steps. Where the model's decoding step
can be captured (a fixed-size state, no host synchronisation inside the step:
recurrent mixers), the step (forward, greedy choice, state written back in
place) is captured once as a CUDA graph and its replays are timed; the graph's
tokens are checked against the eager ones. Where capture fails the reason is
reported instead. Attention's cache is preallocated for the prompt and the
decoded tokens (``init_state(capacity=)``), so its step is captured too.

``--generate`` times ``LanguageModel.generate`` instead, on the CPU by default
(``--threads``, default 1): for each mixer (default: every registered one but
the nesting layers) a 2-layer LM (``--hidden-size 128 --num-heads 4`` in this
mode unless given), greedy, B=1, at each ``--prompts`` length. Each decoding
step inside ``generate`` is timed (the prefill and the sampling are left out;
the step the model's ``_decoder`` gives generate's loop is wrapped on the
instance); a sample is the median over ``--tokens`` tokens. Models are
interleaved and the sweep is repeated ``--repeats`` times; medians of the
samples are printed with the ratio to attention at the same prompt and each
mixer's ratio of the longest prompt to the shortest (flat is 1).
``--ops`` counts the aten calls of one decoding step and of one mixer call
(:func:`step_op_counts`). ``--compile`` also times
``torch.compile(_decode, fullgraph=True)`` in
generate's loop (what ``generate(compile=True)`` runs) and reports the compile
time (its first two calls).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from seqmix.archs.lm import LanguageModel, LMConfig


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device):
    # No autocast cache: a captured graph must not keep casts of weights made outside it.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)


def _copy_state(dst, src):
    for d, s in zip(dst, src, strict=True):
        for name, t in s.items():
            d[name].copy_(t)


def decode_ms_per_token(layers: list[str], args, device) -> dict:
    torch.manual_seed(0)
    config = LMConfig(vocab_size=320, hidden_size=args.hidden_size, num_heads=args.num_heads, layers=layers)
    model = LanguageModel(config).to(device).eval()
    prompt = torch.randint(0, 256, (1, args.prompt), device=device,
                           generator=torch.Generator(device=device).manual_seed(1))
    row = {"layers": ",".join(layers), "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
           "prompt": args.prompt, "tokens": args.tokens}
    with torch.no_grad(), _autocast(device):
        logits, state = model(prompt, model.init_state(1, capacity=args.prompt + args.tokens + 1))
        first = logits[:, -1].argmax(-1, keepdim=True)
        times, tok, eager_tokens = [], first, []
        start_state = [{k: v.clone() for k, v in s.items()} for s in state]
        for _ in range(args.tokens):
            _sync(device)
            t0 = time.perf_counter()
            logits, state = model(tok, state)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
            eager_tokens.append(tok.item())
        row["eager_ms_per_token"] = statistics.median(times)
        grown = [name for s0, s1 in zip(start_state, state, strict=True) for name in s0
                 if s0[name].shape != s1[name].shape]
        if grown:
            row.update(graph_ms_per_token=None, graph_error=f"the state grows each step ({grown[0]}): not captured")
        elif device.type == "cuda":
            row.update(_graph_decode(model, first, start_state, eager_tokens, args.tokens))
    return row


def _graph_decode(model, first, state, eager_tokens, steps) -> dict:
    """Capture one decoding step (state updated in place, greedy token written back) and time its replays."""
    static_tok = first.clone()

    def step():
        logits, new_state = model(static_tok, state)
        _copy_state(state, new_state)
        static_tok.copy_(logits[:, -1].argmax(-1, keepdim=True))

    saved = [{k: v.clone() for k, v in s.items()} for s in state]
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up outside the graph (compiles, allocates workspaces)
        torch.cuda.current_stream().wait_stream(side)
        _copy_state(state, saved)
        static_tok.copy_(first)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except Exception as e:  # noqa: BLE001  (a step that cannot be captured is a result, not a failure)
        return {"graph_ms_per_token": None, "graph_error": f"{type(e).__name__}: {e}"[:300]}
    _copy_state(state, saved)
    static_tok.copy_(first)
    tokens, start, end = [], torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(steps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        tokens.append(static_tok.item())
    agree = sum(a == b for a, b in zip(tokens, eager_tokens, strict=True)) / steps
    return {"graph_ms_per_token": statistics.median(times), "graph_tokens_agree": agree}


# The layers that nest other mixers are left out of --generate's default sweep.
NESTING = ("hourglass", "recurrent_depth")


def _generate_step_ms(model, prompt, tokens: int) -> list[float]:
    """ms of each decoding step inside ``model.generate(prompt, tokens + 1)`` (greedy): the step its loop calls
    per token (what ``_decoder`` returns: the bound C++ steps on the CPU where every layer has them, else
    ``_decode``) is wrapped on the instance, so the prefill and the sampling are left out."""
    decoder, times = model._decoder, []

    def timed_decoder(*args):
        decode = decoder(*args)

        def timed(tokens, state):
            start = time.perf_counter()
            out = decode(tokens, state)
            times.append((time.perf_counter() - start) * 1e3)
            return out

        return timed

    model._decoder = timed_decoder
    try:
        model.generate(prompt, tokens + 1, temperature=0.0)
    finally:
        del model._decoder
    return times


def _compiled_step_ms(model, prompt, tokens: int) -> tuple[list[float], float]:
    """ms of each call of ``torch.compile(model._decode, fullgraph=True)`` in generate's greedy loop
    (what ``generate(compile=True)`` runs), and the seconds of the first two calls (compilation)."""
    step, options = torch.compile(model._decode, fullgraph=True), model._step_options(None, None, None)
    with torch.no_grad():
        logits, state = model(prompt, model.init_state(1, capacity=prompt.shape[1] + tokens + 3))
        token = logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(2):  # the second call may recompile (a state's strides change after the first step)
            logits, state = step(token, state, options)
            token = logits.argmax(-1, keepdim=True)
        compile_s, times = time.perf_counter() - start, []
        for _ in range(tokens):
            start = time.perf_counter()
            logits, state = step(token, state, options)
            times.append((time.perf_counter() - start) * 1e3)
            token = logits.argmax(-1, keepdim=True)
    return times, compile_s


def step_op_counts(model, prompt) -> dict:
    """Aten calls dispatched from Python (the profiler's top-level ``aten::`` events) in one decoding step of
    ``model`` after ``prompt`` as ``generate`` runs it (``_decoder``'s step; ``decode_step`` adds its checks) and in
    one call of its first mixer: at hidden 128 the step's time is about proportional to them."""
    from torch.profiler import ProfilerActivity, profile

    def count(fn) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)

    options = model._step_options(None, None, None)
    with torch.no_grad():
        logits, state = model(prompt, model.init_state(1, capacity=prompt.shape[1] + 4))
        token = logits[:, -1:].argmax(-1)
        decode = model._decoder(state, options, False)
        _, state = decode(token, state)
        x = torch.randn(1, 1, model.config.hidden_size, device=prompt.device)
        return {"step_aten_calls": count(lambda: decode(token, state)),
                "mixer_aten_calls": count(lambda: model.blocks[0].mixer(x, state[0]))}


def generate_rows(args, device) -> list[dict]:
    """Decode ms/token through ``LanguageModel.generate`` per mixer and prompt, prefill excluded (module doc)."""
    from seqmix.archs import MIXERS

    names = args.mixers or [n for n in sorted(MIXERS) if n not in NESTING]
    if "attention" not in names:
        names = ["attention", *names]
    models = {}
    for name in names:
        torch.manual_seed(0)
        config = LMConfig(vocab_size=320, hidden_size=args.hidden_size, num_heads=args.num_heads, layers=[name] * 2)
        models[name] = LanguageModel(config).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = {p: torch.randint(0, 256, (1, p), generator=gen).to(device) for p in args.prompts}
    samples, compile_s = {}, {}
    for _ in range(args.repeats):
        for name, model in models.items():
            for p, prompt in prompts.items():
                samples.setdefault((name, p, False), []).append(
                    statistics.median(_generate_step_ms(model, prompt, args.tokens)))
                if args.compile:
                    times, seconds = _compiled_step_ms(model, prompt, args.tokens)
                    samples.setdefault((name, p, True), []).append(statistics.median(times))
                    compile_s.setdefault((name, p), seconds)
    rows = []
    for (name, p, compiled), values in samples.items():
        row = {"mixer": name, "prompt": p, "compiled": compiled, "ms_per_token": statistics.median(values),
               "samples": values}
        if compiled:
            row["compile_s"] = compile_s[(name, p)]
        elif args.ops:
            row.update(step_op_counts(models[name], prompts[p]))
        rows.append(row)
    by_key = {(r["mixer"], r["prompt"], r["compiled"]): r for r in rows}
    lo, hi = min(args.prompts), max(args.prompts)
    for r in rows:
        r["vs_attention"] = r["ms_per_token"] / by_key[("attention", r["prompt"], r["compiled"])]["ms_per_token"]
        r["long_over_short"] = by_key[(r["mixer"], hi, r["compiled"])]["ms_per_token"] / by_key[
            (r["mixer"], lo, r["compiled"])]["ms_per_token"]
    return rows


def _print_generate(rows, args, device):
    print(f"\nDecoding through LanguageModel.generate, B=1, 2-layer LM hidden {args.hidden_size}, {args.num_heads} "
          f"heads, {device}, {torch.get_num_threads()} threads, greedy, prefill excluded, median of {args.repeats}")
    print(f"{'mixer':<16} {'compiled':>8} {'prompt':>7} {'ms/token':>9} {'vs attention':>13} {'long/short':>11}"
          f" {'compile s':>10} {'aten calls: step, mixer':>24}")
    for r in sorted(rows, key=lambda r: (r["compiled"], r["mixer"] != "attention", r["mixer"], r["prompt"])):
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        ops = f"{r['step_aten_calls']}, {r['mixer_aten_calls']}" if "step_aten_calls" in r else "-"
        print(f"{r['mixer']:<16} {'yes' if r['compiled'] else 'no':>8} {r['prompt']:>7} {r['ms_per_token']:>9.3f} "
              f"{r['vs_attention']:>12.2f}x {r['long_over_short']:>10.2f}x {compile_s:>10} {ops:>24}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=["attention*16", "deltanet*16"])
    parser.add_argument("--hidden-size", type=int, default=None, help="default 512 (128 with --generate)")
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke test; no timing claims)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--generate", action="store_true", help="time LanguageModel.generate per mixer (module doc)")
    parser.add_argument("--mixers", nargs="+", help="--generate: the mixers (default every non-nesting one)")
    parser.add_argument("--prompts", nargs="+", type=int, default=[64, 2048], help="--generate: prompt lengths")
    parser.add_argument("--repeats", type=int, default=3, help="--generate: sweeps whose medians are reported")
    parser.add_argument("--compile", action="store_true", help="--generate: also generate(compile=True)")
    parser.add_argument("--device", default="cpu", help="--generate: the device (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="--generate: torch CPU threads")
    parser.add_argument("--ops", action="store_true", help="--generate: also count the aten calls of one step")
    args = parser.parse_args(argv)
    if args.generate:
        args.hidden_size = args.hidden_size or 128
        device, threads = torch.device(args.device), torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            rows = generate_rows(args, device)
            _print_generate(rows, args, device)
        finally:
            torch.set_num_threads(threads)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return rows
    args.hidden_size = args.hidden_size or 512
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("the decoding benchmark needs a CUDA GPU (or --cpu for a smoke run)")
    device = torch.device("cpu" if args.cpu else "cuda")
    rows = [decode_ms_per_token(entry.split(","), args, device) for entry in args.layers]
    print(f"\nDecoding at B=1, {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"prompt {args.prompt}, {args.tokens} greedy tokens{', bf16 autocast' if device.type == 'cuda' else ''}")
    print(f"{'layers':<28} {'params':>7} {'eager ms/tok':>13} {'graph ms/tok':>13}  graph")
    for r in rows:
        graph = f"{r['graph_ms_per_token']:.2f}" if r.get("graph_ms_per_token") is not None else "-"
        note = r.get("graph_error") or (f"tokens agree {r['graph_tokens_agree']:.0%}" if "graph_tokens_agree" in r
                                        else "")
        print(f"{r['layers']:<28} {r['params_M']:>6.1f}M {r['eager_ms_per_token']:>13.2f} {graph:>13}  {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
