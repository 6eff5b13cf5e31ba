"""The quick GPU check's stages; each writes what it measures into one results JSON as it goes.

    python -m benchmarks.gpu_quick STAGE [--out DIR] [--rehearse]

STAGE is one of (``benchmarks/gpu_check.sh quick`` runs them in this order, each
in its own process, so a crash or a timeout in one keeps what the others wrote):

- ``meta``: GPU, driver, torch, Triton, CUDA, fla, the date; the card's copy
  bandwidth and bf16 matmul rate (the ceilings of the roofline floors).
- ``parity``: every fused op of ``benchmarks/anchors.py`` (Triton, and the CUDA
  kernels where the op has them) at its anchor shape in bf16, forward and
  backward, against the reference run in float32 on the same GPU: the relative
  error of the output and of every input's gradient, against the test suite's
  bf16 bound; for the ops with a state, again with a random initial state (the
  final state and the initial state's gradient too) and at T=1 (decoding; the
  conv's in-place update op too). Run with ``SEQMIX_AUTOTUNE=0`` (one config
  per kernel).
- ``warm``: one forward and one forward+backward call of each op (and of its
  comparators) at its anchor shape, which compiles every autotune config into
  Triton's cache; the shell runs one process per op at once (compiling is CPU
  work, 16 cores), and each op's seconds are its autotune set's compile time.
  ``--ops lm`` warms the DeltaNet LM of the train and decode stages.
- ``bench``: SDPA at H16 D128 first, then each op at its anchor shape, forward
  and forward+backward, next to its comparator (fla-core, installed from its
  wheel; mamba_ssm if present) in the same process, one op after another
  (``--ops sdpa`` times SDPA alone; the shell runs one process per op, each
  with its own time limit); the time of the first calls (the autotuner timing
  every config) is recorded as ``autotune_s``, and the config each autotuned
  kernel chose as ``autotune``.
- ``train``: one training step of the ~50M LM with DeltaNet and with attention
  (B8 T2048, bf16 autocast; ``benchmarks/bench_train.py``).
- ``decode``: ms per token at B=1, eager and as a CUDA graph where the step can be
  captured (``benchmarks/bench_decode.py``).
- ``tests``: the test suite with one config per kernel, stopped after ``--seconds``.

``merge PART...`` adds the results files of parallel runs (``--out`` elsewhere) to ``--out``'s.

``--rehearse`` runs the same code on the CPU under Triton's interpreter at tiny
shapes in float32 (the interpreter has no bf16), so a script error costs no GPU
time; its results are marked ``"rehearsal": true`` and its times are host-clock
times of interpreted kernels, not performance.

The results file is ``DIR/results.json`` (``--out``, default ``$OUT`` or
``gpu_check_out``); ``python -m benchmarks.results_table`` prints it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

STAGES = ("meta", "parity", "warm", "bench", "train", "decode", "tests")
SDPA_SHAPE = {"B": 8, "T": 2048, "H": 16, "D": 128}
TINY_SDPA_SHAPE = {"B": 1, "T": 70, "H": 2, "D": 16}


class Results:
    """The results JSON, rewritten whole (to a temporary file, then renamed) after every addition."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self._write()

    def add(self, key: str, item: dict) -> None:
        self.data.setdefault(key, []).append(item)
        self._write()
        print(json.dumps(item, default=str), flush=True)

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def _device(rehearse: bool):
    import torch

    if rehearse:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("the GPU check needs a CUDA GPU (or --rehearse for the CPU dress rehearsal)")
    return torch.device("cuda")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def stage_meta(results: Results, device, args) -> None:
    import torch
    import triton

    from seqmix.kernels.backend import cuda_extension

    ext = cuda_extension()
    meta = {
        "rehearsal": args.rehearse,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
        "sms": torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "fla_core": _package_version("fla-core"),
        "mamba_ssm": _package_version("mamba-ssm"),
        # seqmix.hf follows transformers' names, which moved within 5.x (the GPU machine had 5.17, this 5.25)
        "transformers": _package_version("transformers"),
        "seqmix_cuda_archs": list(ext.cuda_archs()) if ext is not None else None,
        "commit": os.environ.get("SEQMIX_COMMIT") or _git_commit(),
        "install_s": float(os.environ["SEQMIX_INSTALL_S"]) if os.environ.get("SEQMIX_INSTALL_S") else None,
    }
    if device.type == "cuda":
        meta["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip()
    results.set("meta", meta)
    results.set("ceilings", measure_ceilings(device, args.rehearse))
    print(json.dumps({**meta, **results.data["ceilings"]}), flush=True)


def _git_commit() -> str | None:
    """The checkout's commit, when it is a git checkout and git is installed (else set SEQMIX_COMMIT)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent)
    except OSError:
        return None
    return proc.stdout.strip() or None


def measure_ceilings(device, rehearse: bool) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second) and the bf16 matmul rate on random
    data, the two ceilings the floors are computed with (the anchor table's H100 values in the rehearsal)."""
    import torch

    from benchmarks import common

    if rehearse:
        return {"copy_bytes_per_s": common.COPY_BYTES_PER_S, "matmul_flop_per_s": common.MATMUL_FLOP_PER_S,
                "measured": False}
    from triton.testing import do_bench

    src = torch.randn(2**30 // 2, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm_ms = do_bench(lambda: a @ b, return_mode="median")
    src = dst = a = b = None  # free the 3 GiB before the next stage
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": 2 * 2**30 / copy_ms * 1e3, "matmul_flop_per_s": 2 * 8192**3 / mm_ms * 1e3,
            "measured": True}


def _use_ceilings(results: Results) -> None:
    """Compute the floors with the ceilings the meta stage measured on this card."""
    from benchmarks import common

    ceilings = results.data.get("ceilings")
    if ceilings:
        common.COPY_BYTES_PER_S = ceilings["copy_bytes_per_s"]
        common.MATMUL_FLOP_PER_S = ceilings["matmul_flop_per_s"]


def _anchors(ops: str | None):
    from benchmarks.anchors import ANCHORS

    chosen = [a for a in ANCHORS if ops is None or a.op in ops.split(",")]
    if not chosen:
        raise SystemExit(f"--ops {ops!r} names none of {[a.op for a in ANCHORS]}")
    return chosen


def stage_parity(results: Results, device, args) -> None:
    """Per op and fused backend: ``train`` (the op's output and every input's gradient), ``state`` (with a
    random initial state: the final state too, and the initial state's gradient) at the anchor shape,
    ``decode`` (T=1 with a state, no gradient: the token-by-token kernels) and ``update`` (a separate
    decoding op)."""
    import torch

    from benchmarks.anchors import fused_backends

    dtype = torch.float32 if args.rehearse else torch.bfloat16
    for anchor in _anchors(args.ops):
        sizes = anchor.sizes(args.rehearse)
        for backend in fused_backends(anchor, device):
            torch.manual_seed(0)
            fns = anchor.impls([backend, "reference"])
            names = list(inspect.signature(fns[backend]).parameters)
            _parity(results, anchor.op, backend, "train", sizes, fns[backend], fns["reference"],
                    lambda s, grad: anchor.make_inputs(s, dtype, grad, device), names, dtype, device)
            if anchor.stateful is None:
                continue
            def with_state(s, grad):
                return [*anchor.make_inputs(s, dtype, grad, device),
                        anchor.initial_state(s, dtype, device).requires_grad_(grad)]
            fused, reference = anchor.stateful(backend), anchor.stateful("reference")
            names = [*names, "h0"]
            _parity(results, anchor.op, backend, "state", sizes, fused, reference, with_state, names, dtype, device)
            _parity(results, anchor.op, backend, "decode", {**sizes, "T": 1}, fused, reference, with_state, names,
                    dtype, device, grad=False)
            if anchor.update is not None:
                _parity(results, anchor.op, backend, "update", {**sizes, "T": 1}, anchor.update(backend),
                        anchor.update("reference"), with_state, names, dtype, device, grad=False)


def _parity(results, op, backend, case, sizes, fn, ref_fn, make_inputs, arg_names, dtype, device, grad=True) -> None:
    """Compare ``fn`` with ``ref_fn`` (float32) on fresh inputs (``make_inputs(sizes, grad)``, named
    ``arg_names``); record the errors, pass or fail."""
    import torch

    from benchmarks.common import rel_errors
    from tests.helpers import TOL

    inputs = make_inputs(sizes, grad)
    start = time.perf_counter()
    try:
        errors = rel_errors(fn, ref_fn, inputs)
        error = None
    except Exception as e:  # noqa: BLE001  (recorded as a failure; the other checks still run)
        errors, error = [], f"{type(e).__name__}: {e}"
        traceback.print_exc()
    _sync(device)
    outputs = ["out", "ht"][: len(errors) - sum(t.requires_grad for t in inputs)] if errors else []
    names = outputs + [f"d{arg_names[i]}" for i, t in enumerate(inputs) if t.requires_grad]
    results.add("parity", {
        "op": op, "backend": backend, "case": case, **sizes, "dtype": str(dtype).removeprefix("torch."),
        "errors": dict(zip(names, errors)), "max_error": max(errors) if errors else None,
        "tolerance": TOL[dtype], "passed": bool(errors) and max(errors) <= TOL[dtype], "error": error,
        "seconds": time.perf_counter() - start,
    })
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sdpa_impls(device) -> dict:
    import torch.nn.functional as F

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)

    if device.type != "cuda":
        return {"sdpa": attention}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def with_backend(backend):
        def call(q, k, v):
            with sdpa_kernel(backend):
                return attention(q, k, v)
        return call

    return {"sdpa_flash": with_backend(SDPBackend.FLASH_ATTENTION),
            "sdpa_cudnn": with_backend(SDPBackend.CUDNN_ATTENTION)}


def sdpa_floor_ms(B, T, H, D, elem_bytes, backward) -> float:
    """Causal attention: q, k, v read and o written once; Q K^T and P V over half the square (4 B H T^2 D / 2
    FLOPs forward); the backward does 2.5 times the forward's matmuls."""
    from benchmarks.common import floor_ms

    io = B * T * H * D * 4 * elem_bytes
    flops = 2 * B * H * T * T * D
    return floor_ms(io * (3 if backward else 1), flops * (3.5 if backward else 1))


def _first_calls(anchor, sizes, dtype, device, comparators: bool = False) -> float:
    """Seconds of one forward and one forward+backward call of each fused backend (and with ``comparators``
    of the comparators that import, whose refusals are ignored): on a cold cache the compile of every
    autotune config of every kernel, and the autotuner's timing of them."""
    import torch

    from benchmarks.anchors import fused_backends

    start = time.perf_counter()
    fused = fused_backends(anchor, device)
    impls = anchor.impls(fused)
    names = [n for n in impls if n in fused or (comparators and n not in ("reference", "torch"))]
    for backward in (False, True):
        inputs = anchor.make_inputs(sizes, dtype, backward, device)
        for name in names:
            try:
                out = impls[name](*inputs)
                if backward:
                    out.backward(torch.randn_like(out))
            except Exception:
                if name in fused:
                    raise
    _sync(device)
    return time.perf_counter() - start


def stage_warm(results: Results, device, args) -> None:
    """Compile every autotune config of the ops' kernels (and the comparators') into Triton's cache; the
    shell runs one process per op at once (compiling is CPU work). The seconds per op are its autotune
    set's compile time. ``--ops lm`` instead runs one training step and a few decoding steps of the
    DeltaNet LM, whose kernels are specialised for its own head count."""
    import torch

    dtype = torch.float32 if args.rehearse else torch.bfloat16
    if args.ops == "lm":
        start = time.perf_counter()
        _lm_stage("train", args, warm=True)
        _lm_stage("decode", args, warm=True)
        results.add("warm", {"op": "lm", "compile_and_autotune_s": time.perf_counter() - start})
        return
    for anchor in _anchors(args.ops):
        seconds = _first_calls(anchor, anchor.sizes(args.rehearse), dtype, device, comparators=True)
        results.add("warm", {"op": anchor.op, "compile_and_autotune_s": seconds})


def stage_bench(results: Results, device, args) -> None:
    import torch

    from benchmarks.anchors import fused_backends
    from benchmarks.common import measure

    _use_ceilings(results)
    dtype = torch.float32 if args.rehearse else torch.bfloat16
    name = str(dtype).removeprefix("torch.")
    s = TINY_SDPA_SHAPE if args.rehearse else SDPA_SHAPE

    def sdpa_inputs(shape, grad):
        return [torch.randn(shape["B"], shape["T"], shape["H"], shape["D"], device=device, dtype=dtype,
                            requires_grad=grad) for _ in range(3)]

    ops = None if args.ops is None else args.ops.split(",")
    if ops is None or "sdpa" in ops:
        for row in measure("sdpa", [s], _sdpa_impls(device), sdpa_inputs,
                           lambda sh, bwd: sdpa_floor_ms(sh["B"], sh["T"], sh["H"], sh["D"], dtype.itemsize, bwd),
                           name):
            results.add("bench", row)
        if ops == ["sdpa"]:
            return
    for anchor in _anchors(args.ops):
        sizes = anchor.sizes(args.rehearse)
        impls = anchor.impls(fused_backends(anchor, device))
        try:  # the first calls autotune (compiling what the warm stage did not): their time is reported
            autotune_s = _first_calls(anchor, sizes, dtype, device)
            rows = measure(anchor.op, [sizes], impls, lambda sh, grad: anchor.make_inputs(sh, dtype, grad, device),
                           lambda sh, bwd: anchor.floor(sh, dtype.itemsize, bwd), name, anchor=anchor.comparator)
        except Exception as e:  # noqa: BLE001  (recorded; the other ops still run)
            traceback.print_exc()
            results.add("bench_errors", {"op": anchor.op, "error": f"{type(e).__name__}: {e}"})
            continue
        for row in rows:
            results.add("bench", {**row, "autotune_s": autotune_s if row["impl"] in ("triton", "cuda") else None})
        for choice in autotune_choices():
            results.add("autotune", {"op": anchor.op, **choice})


def autotune_choices() -> list[dict]:
    """The config that each of seqmix's autotuned Triton kernels chose in this process, per autotune key (the
    ``KERNELS`` of the imported kernel modules): which configs win at the anchor shapes, for pruning the lists
    that every first call compiles. A kernel with one config (the interpreter, ``SEQMIX_AUTOTUNE=0``) chooses
    nothing."""
    from triton.runtime.autotuner import Autotuner

    choices = []
    for name, module in sorted(sys.modules.items()):
        if not name.startswith("seqmix.kernels."):
            continue
        for kernel in getattr(module, "KERNELS", ()):
            if isinstance(kernel, Autotuner):
                for key, config in kernel.cache.items():
                    choices.append({"kernel": kernel.base_fn.__name__, "key": str(key), "config": str(config)})
    return choices


def _lm_stage(which: str, args, warm: bool = False) -> list[dict]:
    """bench_train / bench_decode with their defaults (the ~50M models at B8 T2048, B=1 decoding), tiny on
    the CPU in the rehearsal; ``warm``: the DeltaNet model alone, one step."""
    from benchmarks import bench_decode, bench_train

    tiny = {"train": ["--cpu", "--hidden-size", "32", "--num-heads", "2", "--batch", "2", "--seq-len", "64"],
            "decode": ["--cpu", "--hidden-size", "32", "--num-heads", "2", "--prompt", "8"]}[which]
    argv = tiny if args.rehearse else []
    layers = ["deltanet*2"] if args.rehearse else ["deltanet*16"]
    if warm:
        argv = [*argv, "--layers", *layers, *(["--steps", "1", "--warmup", "0"] if which == "train" else
                                              ["--tokens", "2"])]
    elif args.rehearse:
        argv = [*argv, "--layers", "attention*2", *layers,
                *(["--steps", "1", "--warmup", "1"] if which == "train" else ["--tokens", "2"])]
    return (bench_train if which == "train" else bench_decode).main(argv)


def stage_train(results: Results, device, args) -> None:
    for row in _lm_stage("train", args):
        results.add("train", row)


def stage_decode(results: Results, device, args) -> None:
    for row in _lm_stage("decode", args):
        results.add("decode", row)


def stage_tests(results: Results, device, args) -> None:
    """The test suite (one autotune config per kernel) within ``--seconds``; its summary line is kept, and each
    failure's traceback goes to ``failures.log`` as it happens (tests/conftest.py), so a suite stopped at the
    limit keeps them."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args]
    failures = Path(args.out) / "failures.log"
    failures.unlink(missing_ok=True)
    env = {**os.environ, "SEQMIX_AUTOTUNE": "0", "SEQMIX_FAILURE_LOG": str(failures.resolve())}
    if not args.rehearse:
        env["SEQMIX_HYPOTHESIS_PROFILE"] = "gpu"
    start = time.perf_counter()
    log = Path(args.out) / "pytest.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the session holds the xdist workers too
            proc.wait()
            rc = None
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    failed = sorted({line[4:].split(" (")[0] for line in failures.read_text().splitlines() if line.startswith("=== ")}
                    if failures.exists() else [])
    results.set("tests", {"command": " ".join(cmd[1:]), "exit": rc, "timed_out": rc is None, "summary": summary,
                          "failed": failed, "seconds": time.perf_counter() - start})
    print(f"tests: {summary} (exit {rc})", flush=True)


def merge(out: Path, parts: list[Path]) -> None:
    """Add each part's results (a parallel stage's processes write their own files) to ``out``'s results JSON."""
    results = Results(out / "results.json")
    for part in parts:
        for key, value in json.loads(part.read_text()).items():
            if isinstance(value, list):
                results.data.setdefault(key, []).extend(value)
            else:
                results.data[key] = value
    results._write()


def main(argv=None) -> int:
    """Run one stage; exit status 1 when a parity check failed or an op could not be timed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=(*STAGES, "merge"))
    parser.add_argument("parts", nargs="*", type=Path, help="merge: results JSONs of parallel runs to add to --out's")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--rehearse", action="store_true", help="CPU, Triton interpreter, tiny shapes, float32")
    parser.add_argument("--ops", help="parity, warm, bench: comma-separated ops of benchmarks/anchors.py (bench: "
                                      "also sdpa)")
    parser.add_argument("--seconds", type=float, default=600, help="tests: stop the suite after this long")
    parser.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=["tests"], help="tests: what pytest gets")
    args = parser.parse_args(argv)
    if args.stage == "merge":
        merge(Path(args.out), args.parts)
        return 0
    if args.rehearse and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("--rehearse needs TRITON_INTERPRET=1 set before Python starts")
    if args.stage == "parity":
        os.environ["SEQMIX_AUTOTUNE"] = "0"  # read when the kernels are defined: one config per kernel
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out / "results.json")
    device = _device(args.rehearse)
    before = {k: len(results.data.get(k, [])) for k in ("parity", "bench_errors")}
    globals()[f"stage_{args.stage}"](results, device, args)
    failed = [p for p in results.data.get("parity", [])[before["parity"]:] if not p["passed"]]
    return int(bool(failed) or len(results.data.get("bench_errors", [])) > before["bench_errors"])


if __name__ == "__main__":
    sys.exit(main())
