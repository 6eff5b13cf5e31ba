"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU.

Triton's interpreter checks what kernels compute, not whether they compile:
a loop-carried value that changes type, a dot below the minimum tile or an
unsupported op only fails when the kernel is compiled for a real target.
Compiling needs no GPU (Triton ships ptxas), only a process where
``TRITON_INTERPRET`` is off, so the tests run :func:`compile_in_subprocess`.

The compile specialises the arguments as Triton's runtime does at a real
launch: a pointer to a 16-byte aligned tensor (every tensor torch allocates)
and an integer divisible by 16 carry a divisibility-16 hint, an integer equal
to 1 becomes a constant. Without the hints ptxas cannot vectorise the loads and
reports registers and spills that the launch does not have. Each result
carries the registers, the stack frame (local memory per thread) and the
bytes ptxas spills into it, which is how register pressure shows up before a
GPU is at hand.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class AlignedPointer:
    """Stands for a tensor argument of ``dtype`` at a 16-byte aligned address, as the runtime sees it."""

    def __init__(self, dtype):
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 256


def _runtime_specialization(param, value):
    """(signature type, attribute string) for ``value`` as Triton's launcher computes them."""
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    if isinstance(value, str) and value.startswith("*"):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "i32": torch.int32,
                 "i64": torch.int64, "i8": torch.int8, "u8": torch.uint8, "i1": torch.bool}[value[1:]]
        value = AlignedPointer(dtype)
    elif isinstance(value, str):
        return value, ""  # a scalar whose value the spec does not give: no hint
    return native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                  not param.do_not_specialize_on_alignment)


def compile_kernel(kernel, args: dict, num_warps: int = 4, num_stages: int = 2):
    """Compile ``kernel`` for sm_90 with the runtime's specialisation. ``args`` gives, per parameter,
    a pointer type such as ``"*bf16"`` (taken as 16-byte aligned), a scalar type such as ``"fp32"``
    (no hint), a Python scalar (specialised by its value, as at a launch) or the value of a
    constexpr (None included). Returns (resources dict, compiled kernel)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = args[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, attr = _runtime_specialization(param, value)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = attr
        elif attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas' report when it compiles (not on a cache hit)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    usage = {"kernel": fn.__name__, "num_warps": num_warps, "num_stages": num_stages,
             "shared": compiled.metadata.shared, **resource_usage(compiled, log.getvalue())}
    return usage, compiled


def resource_usage(compiled, ptxas_log: str = "") -> dict:
    """Registers and stack frame bytes per thread from ``cuobjdump -res-usage``, and the spill stores
    and loads (bytes) from ptxas' report: ``ptxas_log`` when the compile printed it, else (a cache
    hit) ptxas run again on the PTX where the stack frame is not empty. (cuobjdump's LOCAL counts
    ``.local`` declarations, which Triton never makes: the stack frame is where its local memory lives.)"""
    text = _tool("cuobjdump", "-res-usage", data=compiled.asm["cubin"], suffix=".cubin")
    usage = dict(re.findall(r"(REG|STACK):(\d+)", text))
    stack = int(usage.get("STACK", 0))
    if _SPILLS.search(ptxas_log):
        spills = _spills(ptxas_log)
    elif stack:
        spills = _spills(_ptxas_log(compiled))
    else:
        spills = {"spill_stores": 0, "spill_loads": 0}
    return {"regs": int(usage.get("REG", -1)), "stack": stack, **spills}


def _tool(name: str, *args: str, data: bytes | str, suffix: str) -> str:
    """Run one of the CUDA binaries Triton ships on ``data`` written to a temporary file; its stdout and stderr."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name  # a name, or a full path
    with tempfile.NamedTemporaryFile(suffix=suffix, mode="wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        proc = subprocess.run([str(tool), *args, f.name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(name).name} {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _spills(log: str) -> dict:
    stores, loads = _SPILLS.search(log).groups()
    return {"spill_stores": int(stores), "spill_loads": int(loads)}


def _ptxas_log(compiled) -> str:
    """ptxas -v on the kernel's PTX with the flags Triton compiles it with."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "k.cubin")
        return _tool(get_ptxas(90).path, "-v", "-lineinfo", "--regAllocOptLevel=2", "--gpu-name=sm_90a", "-o", out,
                     data=compiled.asm["ptx"], suffix=".ptx")


def print_compiled(specs) -> None:
    """Compile each (kernel, args, config, info) of ``specs`` and print the results as one JSON line."""
    results = []
    for kernel, args, cfg, info in specs:
        usage, _ = compile_kernel(kernel, args, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        results.append({**usage, **info})
    print(json.dumps(results))


def compile_in_subprocess(module: str, timeout: float = 900, args: tuple[str, ...] = ()) -> list[dict]:
    """Run ``python -m module *args`` without the interpreter; the module prints its results as JSON last."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"compiling for sm_90 failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
