"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU.

Triton's interpreter checks what kernels compute, not whether they compile:
a loop-carried value that changes type, a dot below the minimum tile or an
unsupported op only fails when the kernel is compiled for a real target.
Compiling needs no GPU (Triton ships ptxas), only a process where
``TRITON_INTERPRET`` is off, so the tests run :func:`compile_in_subprocess`.
Each result carries the registers, stack and spills that ptxas reports,
which is how register pressure shows up before a GPU is at hand.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compile_kernel(kernel, args: dict, num_warps: int = 4, num_stages: int = 2) -> dict:
    """Compile ``kernel`` for sm_90. ``args`` gives, per parameter, a pointer type such as
    ``"*bf16"``, a scalar type such as ``"fp32"``, or the value of a constexpr (None included)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    signature, constexprs = {}, {}
    for param in fn.params:
        value = args[param.name]
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = value
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return {"kernel": fn.__name__, "num_warps": num_warps, "num_stages": num_stages, "shared": compiled.metadata.shared,
            **_resource_usage(compiled.asm["cubin"])}


def _resource_usage(cubin: bytes) -> dict:
    """REG, STACK and LOCAL (spilled bytes) from ``cuobjdump -res-usage``."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))
    return {"regs": int(usage.get("REG", -1)), "stack": int(usage.get("STACK", 0)), "local": int(usage.get("LOCAL", 0))}


def print_compiled(specs) -> None:
    """Compile each (kernel, args, config, info) of ``specs`` and print the results as one JSON line."""
    results = []
    for kernel, args, cfg, info in specs:
        results.append({**compile_kernel(kernel, args, num_warps=cfg.num_warps, num_stages=cfg.num_stages), **info})
    print(json.dumps(results))


def compile_in_subprocess(module: str, timeout: float = 900, args: tuple[str, ...] = ()) -> list[dict]:
    """Run ``python -m module *args`` without the interpreter; the module prints its results as JSON last."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"compiling for sm_90 failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
