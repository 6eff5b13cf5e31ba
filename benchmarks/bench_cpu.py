"""Every registered mixer on the CPU, next to attention: training tokens/s and decoding ms/token.

    python -m benchmarks.bench_cpu --out cpu.json                 # the full table
    python -m benchmarks.bench_cpu --quick --mixers attention mamba

Each model is the tiny config's shape with one mixer in both layers (a 2-layer LM, hidden 128,
4 heads, the default vocabulary of 320), built and timed in this one process:

- train tokens/s: one forward + backward + AdamW step (the trainer's loss and optimizer, gradient
  clipping as in training) at B16 T128 and B2 T2048; the median over ``--repeats`` steps after one
  warm-up step, the models taking turns step by step (load that changes during the run hits all);
- decode ms/token with the prefill excluded, at prompts of 64 and 2048 tokens (batch 1, greedy),
  through the public :meth:`LanguageModel.generate` only: each call of generate N new tokens stamps the
  time as each token comes out (``on_token``; transformers' ``streamer``), and the median gap between
  successive tokens (a decoding step and the greedy choice) is the call's ms/token; the median over
  ``--repeats`` calls. The prefill, before the first token, is in no gap (a difference of two generate
  calls instead would carry the long prompt's noise into every token's time);
- with ``--compile``, also decode ms/token of ``generate(compile=True)`` (its step through
  ``torch.compile(fullgraph=True)``, same measure). Its compile time is reported apart, per model and
  prompt: the gaps of its first call beyond the steady ms/token, left out of ms/token.

Ratios are to seqmix's attention in the same run (tokens/s over attention's; ms/token over
attention's), so a loaded machine shifts every row alike. When ``transformers`` imports, its
``LlamaForCausalLM`` of the same size is timed as well. No claim holds across runs or machines.

At this width a decoded token's time is mostly its weights read once from the cache, so an LM with more
parameters than attention's decodes slower at a short prompt however little its layer step does. With
``--matched-attention`` each mixer whose LM differs in size from attention's also gets an attention LM with
the SwiGLU width that brings it to the same parameter count, timed in the same rounds, and its ratios to it
are printed after the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time

import torch

from seqmix.archs import MIXERS
from seqmix.archs.lm import LanguageModel, LMConfig, default_intermediate_size
from seqmix.train import TrainConfig, _loss, _optimizer, keep_freed_cpu_memory

HIDDEN, HEADS, LAYERS = 128, 4, 2
TRAIN_SHAPES = ((16, 128), (2, 2048))
PROMPTS = (64, 2048)
LLAMA = "llama (transformers)"


def _round_robin_medians(calls: dict, repeats: int) -> dict:
    """The median of what each entry of ``calls`` (key -> fn) returns, its own measurement: one warm-up
    call each, then ``repeats`` rounds that call every entry once, so load that changes during the run
    (a shared machine) hits every entry alike."""
    for fn in calls.values():
        fn()
    samples = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            samples[key].append(fn())
    return {key: statistics.median(v) for key, v in samples.items()}


def _timed(fn):
    """fn as a call that returns its seconds."""
    def run():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def _median_gap(generate):
    """A call that runs ``generate`` once and returns the median gap between its new tokens (seconds)."""
    return lambda: statistics.median(_token_gaps(generate))


def _token_gaps(generate) -> list[float]:
    """Seconds between successive new tokens of one ``generate(stamp)`` call, where ``stamp`` is called as
    each token comes out."""
    stamps = []
    generate(lambda *_: stamps.append(time.perf_counter()))
    return [b - a for a, b in itertools.pairwise(stamps)]


def _tokens(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(batch * 7919 + length))


def seqmix_model(mixer: str, intermediate_size: int | None = None) -> tuple[LanguageModel, LMConfig]:
    torch.manual_seed(0)
    config = LMConfig(hidden_size=HIDDEN, num_heads=HEADS, layers=[mixer] * LAYERS,
                      intermediate_size=intermediate_size)
    return LanguageModel(config), config


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_intermediate_size(params: int) -> int:
    """The SwiGLU width, a multiple of 16, at which the table's attention LM has the nearest count to ``params``
    parameters: each unit of width adds a row of gate, up and down (3 x hidden) to every block. A multiple of 16
    keeps the weights' rows in whole 64-byte lines and the products off their scalar tails, which would make
    the widened LM slower than its size alone (a token at 563 took 1.035x its time at 560, 15 rounds)."""
    default = default_intermediate_size(HIDDEN)
    base = parameter_count(seqmix_model("attention")[0])
    return default + 16 * round((params - base) / (3 * HIDDEN * LAYERS * 16))


def seqmix_train_step(model: LanguageModel, config: LMConfig, batch: int, length: int):
    train = TrainConfig(model=config, autocast="none")
    optimizer = _optimizer(model, train, torch.device("cpu"))
    tokens = _tokens(batch, length + 1, config.vocab_size)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        loss = _loss(model, x, y, train, torch.device("cpu"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def seqmix_generate(model: LanguageModel, prompt: torch.Tensor, new_tokens: int, compile: bool = False):
    """generate(stamp): greedy decoding of ``new_tokens``, ``stamp`` called as each comes out."""
    return lambda stamp: model.generate(prompt, new_tokens, temperature=0.0, compile=compile, on_token=stamp)


def llama_model():
    """transformers' LlamaForCausalLM of the same size, or None when transformers does not import."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=LMConfig().vocab_size, hidden_size=HIDDEN, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, num_hidden_layers=LAYERS,
                         intermediate_size=default_intermediate_size(HIDDEN),
                         max_position_embeddings=max(PROMPTS) + 256, tie_word_embeddings=False)
    return LlamaForCausalLM(config).train()


def llama_train_step(model, batch: int, length: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = _tokens(batch, length, model.config.vocab_size)

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class _StreamerStamps:
    """transformers' streamer interface calling ``stamp`` per new token (``put`` gets the prompt first)."""

    def __init__(self, stamp):
        self.stamp, self.puts = stamp, 0

    def put(self, tokens):
        self.puts += 1
        if self.puts > 1:
            self.stamp(tokens)

    def end(self):
        pass


def llama_generate(model, prompt: torch.Tensor, new_tokens: int):
    """As :func:`seqmix_generate`, for transformers' Llama."""
    def run(stamp):
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           streamer=_StreamerStamps(stamp))

    return run


class Subject:
    """One model of the table: seqmix's LM with one mixer, or transformers' Llama (``LLAMA``); an attention LM
    widened to another mixer's parameter count names that mixer in ``matches``."""

    def __init__(self, name: str, intermediate_size: int | None = None, matches: str | None = None):
        self.name, self.matches = name, matches
        self.label = name if matches is None else f"{name}, ff {intermediate_size}"
        if name == LLAMA:
            self.model = llama_model()
            self.vocab = self.model.config.vocab_size
        else:
            self.model, self.config = seqmix_model(name, intermediate_size)
            self.vocab = self.config.vocab_size
        self.params = parameter_count(self.model)

    def train_step(self, batch: int, length: int):
        if self.name == LLAMA:
            return llama_train_step(self.model, batch, length)
        return seqmix_train_step(self.model, self.config, batch, length)

    def generate(self, prompt: torch.Tensor, new_tokens: int, compile: bool = False):
        if self.name == LLAMA:
            return llama_generate(self.model, prompt, new_tokens)
        return seqmix_generate(self.model, prompt, new_tokens, compile)


def measure(names: list[str], args) -> list[dict]:
    """The rows: train tokens/s per shape and decode ms/token per prompt length, every model timed in
    the same rounds."""
    subjects = [Subject(name) for name in names]
    if args.matched_attention:
        widths = {s.name: matched_intermediate_size(s.params) for s in subjects if s.name not in ("attention", LLAMA)}
        subjects += [Subject("attention", width, matches=name) for name, width in widths.items()
                     if width != default_intermediate_size(HIDDEN)]
    rows = [{"mixer": s.label, "params_M": s.params / 1e6, "train": {}, "decode": {}} for s in subjects]
    for s, row in zip(subjects, rows):
        if s.matches:
            row["matches"] = s.matches
    if not args.no_train:
        for s in subjects:
            s.model.train()
        calls = {(i, b, t): _timed(s.train_step(b, t)) for i, s in enumerate(subjects) for b, t in args.train_shapes}
        for (i, b, t), seconds in _round_robin_medians(calls, args.repeats).items():
            rows[i]["train"][f"B{b}T{t}"] = b * t / seconds
    if not args.no_decode:
        for s in subjects:
            s.model.eval()
        calls, compile_s = {}, {}
        for i, s in enumerate(subjects):
            for p in args.prompts:
                prompt = _tokens(1, p, s.vocab)
                calls[(i, p, "decode")] = _median_gap(s.generate(prompt, args.new_tokens))
                if args.compile and s.name != LLAMA:
                    generate = s.generate(prompt, args.new_tokens, compile=True)
                    # The first call compiles the step (and recompiles it once if a state's strides change).
                    compile_s[(i, p)] = _token_gaps(generate)
                    calls[(i, p, "decode_compiled")] = _median_gap(generate)
        seconds = _round_robin_medians(calls, args.repeats)
        for (i, p, kind), value in seconds.items():
            rows[i].setdefault(kind, {})[f"prompt{p}"] = value * 1e3
            if kind == "decode_compiled":
                first = compile_s[(i, p)]
                rows[i].setdefault("compile_s", {})[f"prompt{p}"] = sum(first) - len(first) * value
    return rows


def print_table(rows: list[dict]) -> None:
    base = next((r for r in rows if r["mixer"] == "attention"), None)
    columns = [("train", k, "tok/s") for k in rows[0]["train"]] + [("decode", k, "ms/tok") for k in rows[0]["decode"]]
    columns += [("decode_compiled", k, "ms/tok") for k in rows[0].get("decode_compiled", {})]
    print(f"\nCPU, {torch.get_num_threads()} threads, torch {torch.__version__}; 2-layer LM, hidden {HIDDEN}, "
          f"{HEADS} heads; (x) = ratio to seqmix's attention in this run")
    labels = {"decode_compiled": "compiled"}
    print(f"{'mixer':<22}{'params M':>9}" + "".join(f"{f'{labels.get(kind, kind)} {key} {unit}':>30}"
                                                   for kind, key, unit in columns))
    for r in rows:
        cells = []
        for kind, key, _ in columns:
            value = r.get(kind, {}).get(key)
            ref = None if base is None else base.get(kind, {}).get(key)
            ratio = f" ({value / ref:.2f}x)" if value is not None and ref else ""
            cells.append("-" if value is None else (f"{value:.0f}" if kind == "train" else f"{value:.3f}") + ratio)
        print(f"{r['mixer']:<22}{r['params_M']:>9.3f}" + "".join(f"{c:>30}" for c in cells))
    if any("compile_s" in r for r in rows):
        print("compiled: decoding with generate(compile=True), ratios to attention's compiled decode; compile "
              "seconds (left out of ms/token): " + "; ".join(
                  f"{r['mixer']} " + ", ".join(f"{k} {v:.1f}" for k, v in r["compile_s"].items())
                  for r in rows if "compile_s" in r))
    print_matched(rows)


def print_matched(rows: list[dict]) -> None:
    """Each mixer's ratios to the attention LM of its parameter count (``--matched-attention``)."""
    by_name = {r["mixer"]: r for r in rows}
    for twin in (r for r in rows if "matches" in r):
        mixer = by_name[twin["matches"]]
        ratios = ", ".join(f"{kind} {key} {mixer[kind][key] / ref:.2f}x" for kind in ("train", "decode")
                           for key, ref in twin[kind].items())
        print(f"{mixer['mixer']} ({mixer['params_M']:.3f}M) to {twin['mixer']} ({twin['params_M']:.3f}M): {ratios}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", nargs="+", default=None,
                        help=f"mixers to time (default: all registered, attention first): {', '.join(MIXERS)}")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and new tokens (a rough table)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per median (default 5, quick 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="N of the decode timing (default 33, quick 9)")
    parser.add_argument("--train-shapes", nargs="+", default=None, help="BxT entries, default 16x128 2x2048")
    parser.add_argument("--prompts", nargs="+", type=int, default=list(PROMPTS))
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--no-llama", action="store_true", help="skip transformers' Llama even if it imports")
    parser.add_argument("--compile", action="store_true",
                        help="also time decoding with generate(compile=True) (compile time reported apart)")
    parser.add_argument("--matched-attention", action="store_true",
                        help="also time, for each mixer, an attention LM widened (its SwiGLU) to the mixer's "
                             "parameter count, and print the mixer's ratios to it")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads (default: torch's own); on a loaded machine 1 avoids threads "
                             "that wait for each other")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.mixers or ()) - set(MIXERS))
    if unknown:
        parser.error(f"--mixers: unknown {unknown}; registered: {sorted(MIXERS)}")
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.new_tokens = args.new_tokens or (9 if args.quick else 33)
    if args.repeats < 1 or args.new_tokens < 2:
        parser.error("--repeats must be >= 1 and --new-tokens >= 2")
    shapes = args.train_shapes or [f"{b}x{t}" for b, t in TRAIN_SHAPES]
    try:
        args.train_shapes = [tuple(int(n) for n in s.lower().split("x")) for s in shapes]
    except ValueError:
        parser.error(f"--train-shapes: entries are BxT, got {shapes}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    keep_freed_cpu_memory()  # as the trainer does
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:  # one compiled step per model and prompt stays cached while the models take turns
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(MIXERS))
    names = args.mixers or ["attention"] + [m for m in MIXERS if m != "attention"]
    if not args.no_llama and args.mixers is None and llama_model() is not None:
        names.insert(1, LLAMA)
    rows = measure(names, args)
    print_table(rows)
    if args.out:
        meta = {"machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "repeats": args.repeats, "new_tokens": args.new_tokens,
                "compile": args.compile}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
