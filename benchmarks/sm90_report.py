"""Static Hopper report: every Triton kernel the anchor cases launch, compiled for sm_90 and read back.

    python -m benchmarks.sm90_report [--all-configs] [--ops delta_rule,gla] [--md docs/hopper_report.md]
                                     [--json rows.json]

No GPU is needed. Each op of ``benchmarks/anchors.py`` is called forward and
backward at its anchor shape in bfloat16 on CPU tensors (and, for the ops with a
state, decoding one token per sequence), with every Triton
launch intercepted instead of run: that yields the kernels, their arguments
(so the compile gets the runtime's own specialisation: alignment of each
pointer, divisibility of each integer) and the grid at the anchor shape. Each
distinct launch is then compiled for sm_90 (``tests/sm90.py``) and its cubin
disassembled with the cuobjdump Triton ships, giving per kernel: registers,
stack frame and spill bytes, shared memory, tensor-core instructions (HGMMA =
wgmma, HMMA = mma.sync) against FFMA, local-memory instructions, barriers, and
the occupancy (blocks per SM from registers, shared memory and warps) with
the waves the anchor grid needs on the H200's 132 SMs. Only the first autotune
config is compiled unless ``--all-configs``; the GPU's autotuner may pick
another, and Triton's version here may differ from the GPU machine's.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import time
from pathlib import Path

NUM_SMS = 132  # H200 SXM (and H100 SXM)
# Per-SM limits of compute capability 9.0 (CUDA occupancy calculator): 64K registers allocated per warp in units
# of 256, 64 warps, 32 blocks, 228 KB shared memory of which each block also reserves 1 KB.
REGS_PER_SM, REG_UNIT, WARPS_PER_SM, BLOCKS_PER_SM = 65536, 256, 64, 32
SMEM_PER_SM, SMEM_PER_BLOCK_MAX, SMEM_RESERVED = 228 * 1024, 227 * 1024, 1024
OPCODES = ("HGMMA", "HMMA", "FFMA", "FMUL", "FADD", "MUFU", "LDL", "STL", "BAR", "LDG", "STG", "LDGSTS", "UBLKCP",
           "UTMALDG")


def occupancy(regs: int, shared: int, num_warps: int) -> tuple[int, str]:
    """(resident blocks per SM, what limits it) for a kernel of ``regs`` registers per thread, ``shared``
    bytes of shared memory per block and ``num_warps`` warps per block on sm_90; 0 when it cannot launch."""
    if shared > SMEM_PER_BLOCK_MAX:
        return 0, "shared"
    per_warp = math.ceil(regs * 32 / REG_UNIT) * REG_UNIT
    limits = {  # on a tie the first named is reported
        "warps": WARPS_PER_SM // num_warps,
        "blocks": BLOCKS_PER_SM,
        "shared": SMEM_PER_SM // (shared + SMEM_RESERVED),
        "regs": (REGS_PER_SM // per_warp) // num_warps if per_warp else BLOCKS_PER_SM,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def opcode_counts(sass: str) -> dict:
    """How many instructions of each opcode in ``OPCODES`` the SASS holds (static counts), and the total."""
    counts = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            counts["total"] += 1
            op = m.group(1)
            if op in OPCODES:
                counts[op] += 1
    return {op: counts[op] for op in ("total", *OPCODES)}


class Pointer:
    """A traced tensor argument as the launcher sees it: its dtype and whether its address is 16-byte aligned."""

    def __init__(self, tensor):
        self.dtype = tensor.dtype
        self.aligned = tensor.data_ptr() % 16 == 0

    def data_ptr(self) -> int:
        return 256 if self.aligned else 258

    def __repr__(self):
        return f"Pointer({self.dtype}, aligned={self.aligned})"


def _spec(value):
    import torch

    return Pointer(value) if isinstance(value, torch.Tensor) else value


def _grid(grid, meta) -> tuple[int, int, int]:
    grid = grid(meta) if callable(grid) else grid
    return tuple(int(g) for g in grid) + (1,) * (3 - len(grid))


def trace_launches(anchors, all_configs: bool) -> list[dict]:
    """Call each anchor forward and backward in bf16 on the CPU with every Triton launch recorded, not run.

    seqmix must be imported before this (with the interpreter off, so the kernels are compiled
    JITFunctions with every autotune config); the interpreter flag is set only while tracing, so the
    ops' backend choice lets Triton take CPU tensors."""
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches, current = [], {}

    def record(fn, args, kwargs, grid, configs):
        bound = fn.signature.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in fn.arg_names})
        bound.apply_defaults()
        named = {k: _spec(v) for k, v in bound.arguments.items()}
        for index, cfg in enumerate(configs):
            meta = {**bound.arguments, **cfg}
            tuned = {k: v for k, v in cfg.items() if k in fn.arg_names}
            launches.append({**current, "fn": fn, "args": {**named, **tuned}, "config": tuned, "config_index": index,
                             "num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3),
                             "grid": _grid(grid, meta)})

    def jit_run(self, *args, grid, warmup, **kwargs):
        options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
        record(self, args, kwargs, grid, [options])

    def autotuner_run(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs) if all_configs else self.configs[:1]
        record(self.fn, args, kwargs, grid, [c.all_kwargs() for c in configs])

    saved = (JITFunction.run, Autotuner.run, os.environ.get("TRITON_INTERPRET"))
    JITFunction.run, Autotuner.run = jit_run, autotuner_run
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for anchor in anchors:
            torch.manual_seed(0)
            inputs = anchor.make_inputs(anchor.anchor, torch.bfloat16, True, "cpu")
            fn = anchor.impls(["triton"])["triton"]
            current.update(op=anchor.op, stage="fwd")
            out = fn(*inputs)
            current.update(stage="bwd")
            out.backward(torch.randn_like(out))
            if anchor.stateful is not None:  # decoding: one token per sequence with a state, no gradient
                current.update(stage="decode")
                sizes = {**anchor.anchor, "T": 1}
                inputs = [*anchor.make_inputs(sizes, torch.bfloat16, False, "cpu"),
                          anchor.initial_state(sizes, torch.bfloat16, "cpu")]
                with torch.no_grad():
                    anchor.stateful("triton")(*inputs)
                    if anchor.update is not None:
                        anchor.update("triton")(*inputs)
    finally:
        JITFunction.run, Autotuner.run = saved[:2]
        if saved[2] is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved[2]
    return launches


def _launch_key(launch) -> str:
    args = {k: (repr(v) if isinstance(v, Pointer) else v) for k, v in launch["args"].items()}
    return json.dumps([launch["fn"].__name__, launch["num_warps"], launch["num_stages"], args], default=str,
                      sort_keys=True)


def analyse(launches) -> list[dict]:
    """Compile each distinct launch for sm_90 and read registers, spills, shared memory, SASS and occupancy."""
    from tests.sm90 import _tool, compile_kernel

    rows, seen = [], {}
    for launch in launches:
        key = _launch_key(launch)
        if key not in seen:
            start = time.perf_counter()
            usage, compiled = compile_kernel(launch["fn"], launch["args"], launch["num_warps"], launch["num_stages"])
            sass = _tool("cuobjdump", "-sass", data=compiled.asm["cubin"], suffix=".cubin")
            seen[key] = {**usage, **opcode_counts(sass), "compile_s": time.perf_counter() - start}
        r = seen[key]
        blocks = math.prod(launch["grid"])
        per_sm, limiter = occupancy(r["regs"], r["shared"], launch["num_warps"])
        rows.append({
            "op": launch["op"], "stage": launch["stage"], **r, "config": launch["config"],
            "config_index": launch["config_index"], "grid": list(launch["grid"]), "blocks": blocks,
            "blocks_per_sm": per_sm, "limiter": limiter,
            "waves": blocks / (per_sm * NUM_SMS) if per_sm else None,
            "constexprs": {k: v for k, v in launch["args"].items()
                           if k.isupper() and not isinstance(v, Pointer) and v is not None},
        })
    return rows


def findings(r: dict) -> list[str]:
    """What in one kernel's row deserves a look before GPU time is spent on it."""
    notes = []
    if r["HMMA"] and not r["HGMMA"]:
        notes.append("mma.sync only (no wgmma)")
    elif r["HMMA"]:
        notes.append("some dots as mma.sync")
    if r["spill_stores"] or r["spill_loads"]:
        notes.append(f"spills {r['spill_stores']}+{r['spill_loads']} B")
    elif r["stack"]:
        notes.append(f"{r['stack']} B stack")
    if r["blocks_per_sm"] == 0:
        notes.append("cannot launch: shared memory")
    elif r["blocks_per_sm"] == 1 and r["waves"] and r["waves"] > 1:
        notes.append(f"1 block/SM ({r['limiter']}), {r['waves']:.1f} waves")
    if r["waves"] is not None and r["waves"] < 0.5:
        notes.append(f"fills {r['waves']:.0%} of one wave")
    if r["BAR"] > 200:
        notes.append(f"{r['BAR']} barriers")
    return notes


def _table(rows) -> list[str]:
    head = ("| op | stage | kernel | warps/stages config | regs | shared KB | stack/spill B | HGMMA | HMMA | FFMA "
            "| LDL+STL | BAR | instr | grid | blocks/SM (limit) | waves | look at |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        config = " ".join(f"{k}={v}" for k, v in r["config"].items())
        waves = f"{r['waves']:.2f}" if r["waves"] is not None else "-"
        lines.append(
            f"| {r['op']} | {r['stage']} | `{r['kernel'].removesuffix('_kernel')}` "
            f"| {r['num_warps']}/{r['num_stages']} {config} | {r['regs']} | {r['shared'] / 1024:.0f} | {r['stack']}/{r['spill_stores'] + r['spill_loads']} "
            f"| {r['HGMMA']} | {r['HMMA']} | {r['FFMA']} | {r['LDL'] + r['STL']} | {r['BAR']} | {r['total']} "
            f"| {'x'.join(map(str, r['grid']))} | {r['blocks_per_sm']} ({r['limiter']}) | {waves} "
            f"| {'; '.join(findings(r))} |")
    return lines


def markdown(rows, meta) -> str:
    lines = [
        "## The table", "",
        f"Generated by `python -m benchmarks.sm90_report{' --all-configs' if meta['all_configs'] else ''}` on "
        f"{meta['date']} with Triton {meta['triton']} (ptxas {meta['ptxas']}), bf16, at the anchor shapes of "
        "`benchmarks/anchors.py`, each kernel as the op launches it forward and backward. Static instruction "
        "counts; stack/spill: the stack frame and ptxas' spill stores + loads per thread; occupancy from "
        f"registers, shared memory and warps with sm_90's limits; waves = blocks / (blocks per SM x {NUM_SMS} "
        "SMs). The GPU run compiles with the machine's own Triton, which may allocate differently: its autotuned "
        "configs and times are the measurement, this is the map.", "",
        "### First autotune config (what `SEQMIX_AUTOTUNE=0` and the parity check run)", "",
        *_table([r for r in rows if r["config_index"] == 0]),
    ]
    if meta["all_configs"]:
        lines += ["", "### Every autotune config", "", *_table(rows)]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- sm90 table: begin -->", "<!-- sm90 table: end -->"


def write_section(path: Path, text: str) -> None:
    """Replace the generated section of ``path`` (between BEGIN and END) with ``text``, keeping the notes
    around it; a file without the markers is written whole."""
    content = path.read_text() if path.exists() else ""
    if BEGIN in content and END in content:
        head, rest = content.split(BEGIN, 1)
        content = f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}"
    else:
        content = f"{BEGIN}\n{text}{END}\n"
    path.write_text(content)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", help="comma-separated ops of benchmarks/anchors.py (default: all)")
    parser.add_argument("--all-configs", action="store_true", help="compile every autotune config, not the first")
    parser.add_argument("--md", help="write the markdown tables into this file's generated section")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the kernels must be imported for compiling")
    import triton

    import seqmix.kernels  # noqa: F401  (compiled kernels with every autotune config, before tracing)
    from benchmarks.anchors import ANCHORS
    chosen = [a for a in ANCHORS if not args.ops or a.op in args.ops.split(",")]
    rows = analyse(trace_launches(chosen, args.all_configs))
    from triton.backends.nvidia.compiler import get_ptxas_version

    ptxas = re.search(r"release ([\d.]+)", get_ptxas_version(90))
    meta = {"date": time.strftime("%Y-%m-%d"), "triton": triton.__version__, "ptxas": ptxas.group(1) if ptxas else "?",
            "all_configs": args.all_configs}
    text = markdown(rows, meta)
    print(text)
    if args.md:
        write_section(Path(args.md), text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
