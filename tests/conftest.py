"""Test setup: Triton's interpreter on machines without a GPU, poisoned outputs, Hypothesis profiles, the order
of the files, a failure log written as the tests run, and on a GPU no worker left with a broken CUDA context.

Everything here runs before seqmix (and so triton) is imported: Triton decides
at decoration time whether kernels are compiled or interpreted.
"""

import os
import sys

import pytest
import torch

from tests.helpers import ON_GPU

if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "PYTEST_XDIST_WORKER" in os.environ:
    # One test process per core (pytest -n): each, and each process a test starts, takes one CPU thread, or
    # their threads would contend for the cores (waiting OpenMP threads spin: "--threads" in docs/design.md).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ["SEQMIX_POISON_EMPTY"] = "1"

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, max_examples=20, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "gpu", max_examples=60, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("SEQMIX_HYPOTHESIS_PROFILE", "gpu" if ON_GPU else "ci"))
# The quick tier (README, "Tests") draws fewer examples in the property tests that do not fix their own count.
settings.register_profile("quick", parent=settings.get_profile("ci"), max_examples=5)


# Whether this process is one of pytest -n's workers: from the config, not an environment variable (a pytest
# that a worker's test starts inherits the worker's environment).
_XDIST_WORKER = False


def pytest_configure(config):
    """``-m "not slow"`` is the quick tier: on a CPU it loads the ``quick`` profile, unless
    SEQMIX_HYPOTHESIS_PROFILE names one."""
    global _XDIST_WORKER
    _XDIST_WORKER = hasattr(config, "workerinput")
    if config.getoption("markexpr") == "not slow" and not ON_GPU and "SEQMIX_HYPOTHESIS_PROFILE" not in os.environ:
        settings.load_profile("quick")


# The files whose tests take the most time on a 2-core CPU (minutes each: Triton's interpreter, the trainer's
# runs; from pytest --durations), collected first, in this order. pytest -n hands tests to its workers in
# collection order, and a worker that gets one of these last runs on alone while the others have finished.
HEAVY_FIRST = (
    "tests/archs/test_mixers.py",
    "tests/test_readme.py",
    "tests/kernels/gated_linear_attention/test_gla.py",
    "tests/archs/test_compile.py",
    "tests/kernels/deltanet/test_triton.py",
    "tests/kernels/deltanet/test_sm90_compile.py",
    "tests/kernels/test_op.py",
    "tests/kernels/deltanet/test_gated.py",
    "tests/kernels/mamba/test_triton.py",
)


def pytest_collection_modifyitems(config, items):
    """The files of HEAVY_FIRST first; the order within a file, and of the other files, as collected."""
    rank = {path: i for i, path in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_runtest_logreport(report):
    """With ``SEQMIX_FAILURE_LOG`` set, each failure's report is appended to that file as it happens: pytest
    prints tracebacks only at the end, and a GPU run stopped at its time limit (benchmarks/gpu_quick.py's
    tests stage) would keep none. Under pytest -n the controller writes (it receives every worker's reports,
    the crashed workers' included), the workers do not."""
    path = os.environ.get("SEQMIX_FAILURE_LOG")
    if not path or not report.failed or _XDIST_WORKER:
        return
    worker = getattr(getattr(getattr(report, "node", None), "gateway", None), "id", "-")
    with open(path, "a") as f:
        f.write(f"=== {report.nodeid} ({report.when}, worker {worker})\n{report.longreprtext}\n\n")


@pytest.fixture(autouse=ON_GPU)
def _leave_no_broken_cuda_context():
    """On a GPU under pytest -n: after each test, a CUDA error that the device reports (a device-side assert, an
    illegal address) ends this worker. Such an error is sticky, so every later test of the process would fail
    with it; ended, the worker is replaced by a fresh one and pytest-xdist reports the crash against the test
    that ran last."""
    yield
    if not _XDIST_WORKER:
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as e:
        sys.stderr.write(f"the CUDA context of this worker is broken ({e}); ending the worker\n")
        sys.stderr.flush()
        os._exit(3)
