"""Print the tables of a GPU check's results JSON, or write them into the README's performance section.

    python -m benchmarks.results_table [RESULTS.json]            # default: the newest benchmarks/results/*.json
    python -m benchmarks.results_table --readme [RESULTS.json]   # regenerate README.md's performance section

The JSON is what ``benchmarks/gpu_quick.py`` writes (``benchmarks/gpu_check.sh quick``). A rehearsal's
results (CPU, Triton interpreter) are printed under a banner saying so and are refused by ``--readme``:
their times are not performance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- performance table: begin -->", "<!-- performance table: end -->"


def latest_results() -> Path:
    paths = sorted(RESULTS_DIR.glob("*.json"))
    if not paths:
        raise SystemExit(f"no results JSON in {RESULTS_DIR}")
    return paths[-1]


def _f(x, fmt: str, missing: str = "-") -> str:
    return missing if x is None else format(x, fmt)


def _sdpa_ms(results: dict) -> dict:
    """SDPA's fastest time per (B, T, mode) in the same run: the attention layer's cost at H16 D128."""
    best = {}
    for r in results.get("bench", []):
        if r["op"] == "sdpa":
            key = (r["B"], r["T"], r["mode"])
            best[key] = min(best.get(key, float("inf")), r["ms"])
    return best


def tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table the results hold."""
    out = []
    parity = results.get("parity", [])
    if parity:
        rows = []
        for p in parity:
            worst = max(p["errors"], key=p["errors"].get) if p["errors"] else "-"
            rows.append([p["op"], p["backend"], p.get("case", "train"), p["dtype"], _f(p["max_error"], ".1e"), worst,
                         f"{p['tolerance']:.0e}",
                         "pass" if p["passed"] else f"FAIL{': ' + p['error'][:60] if p.get('error') else ''}"])
        out.append(("Parity at the anchor shapes against the float32 reference on the same device (train: output "
                    "and input gradients; state: with an initial state, the final state and its gradient too; "
                    "decode: T=1 with a state)",
                    ["op", "backend", "case", "dtype", "max rel err", "worst", "bound", "result"], rows))
    bench = results.get("bench", [])
    if bench:
        sdpa = _sdpa_ms(results)
        warm = {w["op"]: w["compile_and_autotune_s"] for w in results.get("warm", [])}
        rows = []
        for r in bench:
            dims = " ".join(f"{k}{r[k]}" for k in r if k in ("B", "T", "H", "D", "P", "N", "G", "W", "C", "K"))
            vs_sdpa = sdpa.get((r["B"], r["T"], r["mode"]))
            rows.append([
                r["op"], r["impl"], dims, r["mode"], f"{r['ms']:.3f}",
                f"{r['anchor_over_this']:.2f}x {r['anchor']}" if r.get("anchor_over_this") is not None else "-",
                f"{vs_sdpa / r['ms']:.2f}x" if vs_sdpa and r["op"] != "sdpa" else "-",
                f"{r['floor_ms'] / r['ms']:.1%}",
                _f(warm.get(r["op"]) if r.get("autotune_s") is not None else None, ".0f"),
                _f(r.get("autotune_s"), ".1f"),
            ])
        out.append(("Speed (median ms; X/this > 1: faster than X, same process and inputs; sdpa: the fastest "
                    "causal SDPA at H16 D128 and the same B, T; floor/this: fraction of the roofline floor; "
                    "compile s: every autotune config of the op's kernels compiled, in parallel with the other ops; "
                    "autotune s: the first calls, timing the configs)",
                    ["op", "impl", "shape", "mode", "ms", "comparator/this", "sdpa/this", "floor/this",
                     "compile s", "autotune s"], rows))
    train = results.get("train", [])
    if train:
        base = train[0]["tokens_per_s"]
        out.append(("LM training step", ["layers", "params", "B", "T", "step ms", "tokens/s", "vs first", "peak GiB"],
                    [[r["layers"], f"{r['params_M']:.1f}M", str(r["batch"]), str(r["seq_len"]), f"{r['step_ms']:.1f}",
                      f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / base:.2f}x", _f(r["peak_GiB"], ".1f")]
                     for r in train]))
    decode = results.get("decode", [])
    if decode:
        out.append(("Decoding at B=1", ["layers", "params", "prompt", "eager ms/token", "graph ms/token", "note"],
                    [[r["layers"], f"{r['params_M']:.1f}M", str(r["prompt"]), f"{r['eager_ms_per_token']:.2f}",
                      _f(r.get("graph_ms_per_token"), ".3f"),
                      r.get("graph_error") or (f"graph tokens agree {r['graph_tokens_agree']:.0%}"
                                               if "graph_tokens_agree" in r else "")]
                     for r in decode]))
    return out


def header(results: dict) -> list[str]:
    m, c = results.get("meta", {}), results.get("ceilings") or {}
    lines = []
    if m.get("rehearsal"):
        lines.append("REHEARSAL on the CPU (Triton interpreter, tiny shapes, float32): the times are not performance.")
    lines.append(f"{m.get('device', '?')}, {m.get('date', '?')}: torch {m.get('torch')}, Triton {m.get('triton')}, "
                 f"CUDA {m.get('cuda')}, fla-core {m.get('fla_core')}, seqmix {m.get('commit')}, "
                 f"CUDA extension for {m.get('seqmix_cuda_archs')}, install {_f(m.get('install_s'), '.0f')} s")
    if m.get("continued"):  # a later call's stages merged in (benchmarks/results/README.md)
        k = m["continued"]
        lines.append(f"continued {k['date']} at seqmix {k['commit']}: stages {k['stages']}, ops {k['ops']}")
    if c:
        source = "measured" if c.get("measured") else "assumed: the anchor table's H100, benchmarks/common.py"
        lines.append(f"ceilings ({source}): copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
                     f"bf16 matmul {c['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s")
    for e in results.get("bench_errors", []):
        lines.append(f"bench error: {e['op']}: {e['error'][:200]}")
    t = results.get("tests")
    if t:
        lines.append(f"tests ({t['command']}): {t['summary']} (exit {t['exit']}, {t['seconds']:.0f} s"
                     f"{', stopped at the time limit' if t['timed_out'] else ''})")
        failed = t.get("failed", [])
        if failed:
            lines.append(f"failed ({len(failed)}): {', '.join(failed[:20])}{' ...' if len(failed) > 20 else ''}")
    return lines


def text(results: dict) -> str:
    parts = ["\n".join(header(results))]
    for title, head, rows in tables(results):
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        parts.append("\n".join([title, fmt.format(*head), *(fmt.format(*r) for r in rows)]))
    return "\n\n".join(parts) + "\n"


def markdown(results: dict, source: str) -> str:
    parts = [f"Generated by `python -m benchmarks.results_table --readme` from `{source}`.", "",
             *(f"- {line}" for line in header(results))]
    for title, head, rows in tables(results):
        parts += ["", f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                  *("| " + " | ".join(r) + " |" for r in rows)]
    return "\n".join(parts) + "\n"


def update_readme(readme: Path, results: dict, source: str) -> None:
    if results.get("meta", {}).get("rehearsal"):
        raise SystemExit("refusing to put a rehearsal's (CPU interpreter) numbers in the README")
    content = readme.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{readme} has no '{BEGIN}' ... '{END}' section")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{markdown(results, source)}{END}{tail}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path,
                        help="a results JSON (default: the newest in benchmarks/results)")
    parser.add_argument("--readme", action="store_true", help="rewrite README.md's performance section from it")
    args = parser.parse_args(argv)
    path = args.results or latest_results()
    results = json.loads(path.read_text())
    if args.readme:
        source = str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else path.name
        update_readme(ROOT / "README.md", results, source)
    else:
        sys.stdout.write(text(results))


if __name__ == "__main__":
    main()
