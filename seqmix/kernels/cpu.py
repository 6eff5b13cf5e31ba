"""The C++ CPU kernels (the ``cpu`` backend): the package's ``*_cpu.cpp`` sources, compiled on first use.

``torch.utils.cpp_extension.load`` builds them with the local C++ compiler and ninja into one module,
cached by torch under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) and rebuilt only
when a source or a flag changes. The build targets the vector instructions torch itself uses on this
CPU (AVX2 or AVX-512), named in the module with a hash of the package's path, so that machines and
checkouts sharing a cache each get their own.

Nothing here raises: when the build is impossible (no compiler, no ninja) or fails, :func:`unavailable`
says why, the ``cpu`` backend is unavailable, and the ops' automatic choice falls back to the reference
(``seqmix.kernels.explain`` shows the reason). See docs/design.md, "CPU references (issue 14)".
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger("seqmix.kernels")

# Every family's C++ CPU kernels, relative to seqmix/kernels/.
SOURCES = ("mamba/selective_scan_cpu.cpp", "recurrent_step_cpu.cpp", "row_norm_cpu.cpp",
           "conv/conv_step_cpu.cpp", "conv/conv_cpu.cpp", "mlp_step_cpu.cpp",
           "deltanet/delta_rule_cpu.cpp", "mamba2/ssd_cpu.cpp", "swiglu_cpu.cpp", "norm/rms_norm_cpu.cpp",
           "attention_step_cpu.cpp", "decoder_cpu.cpp", "sample_cpu.cpp", "rotary_cpu.cpp",
           "bindings_cpu.cpp")
# Headers the sources include: a change to one makes the module stale too (see ready()).
HEADERS = ("vec_cpu.h", "args_cpu.h", "rows_cpu.h", "linear_cpu.h", "row_norm_cpu.h", "torch_cpu.h", "decoder_cpu.h")
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}
# -ffp-contract=fast: multiply-adds fuse (ISO C++ mode turns that off); -fopenmp: at::parallel_for's threads.
_FLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp"]

_lock = threading.Lock()
_module = None
_reason: str | None = "not built yet"
_tried = False
_stale = False  # ready() found no current module on disk: not looked for again in this process


def _capability() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _ISA_FLAGS else "DEFAULT"


def build_dir() -> Path:
    """Where this checkout's module is built (one per checkout, torch version and instruction set: two checkouts
    sharing the cache would otherwise rebuild over each other whenever their sources differ, and a module built
    against one torch fails to load in another, with an undefined symbol)."""
    from torch.utils.cpp_extension import get_default_build_root

    here = Path(__file__).parent
    key = hashlib.sha1(f"{here.resolve()} {torch.__version__}".encode()).hexdigest()[:8]
    name = f"seqmix_cpu_{_capability().lower()}_{key}"
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name


def _build():
    from torch.utils.cpp_extension import load

    capability = _capability()
    here = Path(__file__).parent
    directory = build_dir()
    name = directory.name
    directory.mkdir(parents=True, exist_ok=True)
    first = not glob.glob(str(directory / "*.so"))
    if first:
        logger.warning("seqmix: compiling the C++ CPU kernels (once per machine: 1-4 minutes on 2 cores) into %s",
                       directory)
    start = time.perf_counter()
    with _only_builder(directory):
        module = load(name=name, sources=[str(here / s) for s in SOURCES],
                      extra_cflags=_FLAGS + _ISA_FLAGS.get(capability, []), extra_ldflags=["-fopenmp"],
                      build_directory=str(directory), verbose=False)
    if first:
        logger.warning("seqmix: the C++ CPU kernels were compiled in %.0f s", time.perf_counter() - start)
    for built in glob.glob(str(directory / "*.so")):  # stamped current for ready() (ninja skips unchanged builds)
        os.utime(built)
    return module


@contextlib.contextmanager
def _only_builder(directory: Path):
    """This process alone builds in ``directory`` (an advisory lock that the system drops when its holder ends).
    torch's ``load`` marks a build with a ``lock`` file that it deletes when done; a build that was killed (an
    interrupted first run) leaves it behind, and every later ``load`` waits for it forever. Holding this lock, no
    other seqmix process is building here, so such a file is stale and goes. Without ``fcntl`` (Windows) nothing
    is checked."""
    if fcntl is None:
        yield
        return
    with open(directory / "seqmix_build.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = directory / "lock"
        if stale.exists():
            logger.warning("seqmix: removing %s, left by an interrupted build of the C++ CPU kernels", stale)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def _first_complaint(error: Exception) -> str:
    """The gist of a failed build: torch's message quotes every compile command; keep its first line's head
    and the first line that complains (a compiler error, a command not found)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    complaints = [line for line in lines[1:] if ("error" in line.lower() or "not found" in line.lower())
                  and not line.startswith(("FAILED", "ninja:"))]
    if not complaints:
        return lines[0][:300]
    return f"{lines[0].split(':', 1)[0]}: {complaints[0][:300]}"


def _constant_under_compile(fn):
    """fn marked as ``torch.compiler.assume_constant_result`` marks it (the attribute torch's own decorator sets),
    without importing torch._dynamo: that import took ~0.9 s of every process that imported seqmix, though only a
    ``torch.compile`` trace reads the mark (``python -m seqmix.generate`` 2.98 -> 1.85 s; docs/design.md,
    "Thirty-first round"). tests/kernels/test_cpu.py checks that the mark is torch's."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def unavailable() -> str | None:
    """Why the C++ CPU kernels cannot run; None when they are built (the first call builds them).
    ``torch.compile`` runs it while tracing and keeps its answer as a constant: a compiled model whose first
    call is traced builds them then, and its graph holds the choice made with them."""
    global _module, _reason, _tried
    if _tried:
        return _reason
    with _lock:
        if not _tried:
            try:
                _module = _build()
                _reason = None
            # No ninja or compiler, a failed compile or link (torch raises RuntimeError), an unwritable cache
            # directory, a module that does not load: the reference serves.
            except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as e:
                _reason = f"the C++ CPU kernels could not be built: {_first_complaint(e)}"
                logger.warning("seqmix: %s; the PyTorch references serve CPU calls", _reason)
            _tried = True
    return _reason


@_constant_under_compile
def ready() -> bool:
    """Whether the C++ CPU kernels serve without compiling anything: loaded in this process, or compiled for
    this checkout and loaded since every source and this file (which holds the flags) last changed, and then
    loaded here (about a second). Calls whose PyTorch path is cheap enough (training's short conv, the row
    norms) take the C++ kernels only when they are ready, so that a short run on a fresh machine (the README's
    main job) never waits minutes for the compile; a decoding step or the selective scan, which build them,
    make them ready."""
    global _stale
    if _tried:
        return _module is not None
    if _stale:
        return False
    here = Path(__file__).parent
    modules = glob.glob(str(build_dir() / "*.so"))
    sources = [here / s for s in SOURCES + HEADERS] + [Path(__file__)]
    if not modules or max(map(os.path.getmtime, modules)) <= max(s.stat().st_mtime for s in sources):
        _stale = True
        return False
    return unavailable() is None


def extension():
    """The compiled module; raises when :func:`unavailable` gives a reason."""
    why = unavailable()
    if why is not None:
        raise RuntimeError(why)
    return _module

