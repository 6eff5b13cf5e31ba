"""seqmix/kernels/cpu.py: when the C++ CPU kernels serve without a compile (``ready``), the automatic choice
that never compiles them (``select_backend(..., build_cpu=False)``), and the mark that keeps that choice a constant
under ``torch.compile``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from seqmix.kernels import BackendUnavailable, cpu
from seqmix.kernels.backend import recording, select_backend
from tests.helpers import require_cpu_kernels

CPU = torch.device("cpu")


def _fresh(monkeypatch, directory=None):
    """This process as if nothing had asked for the kernels yet (and their module in ``directory``)."""
    for name, value in (("_tried", False), ("_reason", "not built yet"), ("_module", None), ("_stale", False)):
        monkeypatch.setattr(cpu, name, value)
    if directory is not None:
        monkeypatch.setattr(cpu, "build_dir", lambda: directory)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)


def _loads(monkeypatch, fail=False):
    """Record every call of torch's extension loader (each would compile whatever is not current); ``fail``: as
    on a machine without ninja."""
    calls = []
    real = torch.utils.cpp_extension.load

    def load(**kwargs):
        calls.append(kwargs)
        if fail:
            raise RuntimeError("Ninja is required to load C++ extensions")
        return real(**kwargs)

    monkeypatch.setattr("torch.utils.cpp_extension.load", load)
    return calls


def test_without_a_module_nothing_is_ready_and_the_automatic_choice_compiles_nothing(tmp_path, monkeypatch):
    _fresh(monkeypatch, tmp_path)
    calls = _loads(monkeypatch, fail=True)
    assert not cpu.ready()
    with recording() as choices:
        assert select_backend("op", None, CPU, ("cpu", "reference"), build_cpu=False) == "reference"
    assert calls == [] and not cpu._tried
    assert "cpu: the C++ CPU kernels are not compiled here yet (python -m seqmix.kernels.build" in str(choices[0])
    # Asked for by name, or with build_cpu (the default), they are built: here the build fails, and says so.
    with pytest.raises(BackendUnavailable, match="could not be built: Ninja is required"):
        select_backend("op", "cpu", CPU, ("cpu", "reference"), build_cpu=False)
    assert len(calls) == 1


def test_a_module_older_than_the_sources_is_not_ready(tmp_path, monkeypatch):
    _fresh(monkeypatch, tmp_path)
    calls = _loads(monkeypatch, fail=True)
    module = tmp_path / "seqmix_cpu.so"
    module.write_bytes(b"")
    os.utime(module, (0, 0))  # loaded last in 1970: every source changed since
    assert not cpu.ready() and calls == [] and not cpu._tried


def test_a_current_module_is_ready_and_loads_without_a_compile(monkeypatch):
    require_cpu_kernels()  # built (and stamped current) in this process
    objects = sorted(cpu.build_dir().glob("*.o"))
    stamps = [o.stat().st_mtime_ns for o in objects]
    _fresh(monkeypatch)
    calls = _loads(monkeypatch)
    assert cpu.ready() and cpu._module is not None and len(calls) == 1
    assert objects and [o.stat().st_mtime_ns for o in objects] == stamps  # nothing recompiled
    assert select_backend("op", None, CPU, ("cpu", "reference"), build_cpu=False) == "cpu"


def test_a_build_removes_the_lock_an_interrupted_build_left(tmp_path, monkeypatch, caplog):
    """torch's loader waits forever for the ``lock`` file a killed build leaves behind; a build holding seqmix's
    own lock (which the system drops with its holder) knows it is stale and removes it before loading."""
    if cpu.fcntl is None:
        pytest.skip("no fcntl on this platform (Windows): the build takes no lock of its own there, so it has no "
                    "stale lock to find")
    _fresh(monkeypatch, tmp_path)
    (tmp_path / "lock").touch()
    seen = []

    def load(**kwargs):
        seen.append((tmp_path / "lock").exists())
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr("torch.utils.cpp_extension.load", load)
    with caplog.at_level("WARNING", logger="seqmix.kernels"):
        assert cpu.unavailable() is not None  # the fake loader fails: the reference serves
    assert seen == [False] and not (tmp_path / "lock").exists()
    assert "interrupted build" in caplog.text


def test_the_kernels_choice_carries_torch_compilers_constant_mark():
    """unavailable and ready carry what ``torch.compiler.assume_constant_result`` sets on a function, so that a
    ``torch.compile`` trace keeps their answers as constants; seqmix sets that mark itself (importing torch._dynamo
    to have torch set it cost every process ~0.9 s). A torch that marks functions otherwise fails here."""
    def probe():
        return None

    mark = dict(vars(torch.compiler.assume_constant_result(probe)))
    assert mark, "torch.compiler.assume_constant_result no longer marks the function by an attribute"
    for fn in (cpu.unavailable, cpu.ready):
        assert {name: getattr(fn, name, None) for name in mark} == mark, fn.__name__


def test_importing_seqmix_leaves_torch_dynamo_unimported():
    """The models, the kernels and the generate CLI import without torch._dynamo (~0.9 s of a command's start; the
    optimizer of a training run imports it when it is built, a ``torch.compile`` call when it traces)."""
    code = "import sys, seqmix, seqmix.archs, seqmix.kernels, seqmix.generate; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False", out.stdout + out.stderr
