"""seqmix/kernels/checks.py's check of an argument's values: a ValueError on CPU tensors, a device-side
assertion on CUDA tensors (no host synchronisation)."""

import subprocess
import sys

import pytest
import torch

from seqmix.kernels.checks import check_values
from tests.helpers import ON_GPU


def test_a_failed_value_check_raises_on_cpu_tensors():
    x = torch.tensor([1.0, -2.0])
    check_values((x > -3).all(), "x must be > -3", lambda: "unused")
    with pytest.raises(ValueError, match=r"^x must be positive, got a minimum of -2$"):
        check_values((x > 0).all(), "x must be positive", lambda: f"a minimum of {x.min().item():g}")


@pytest.mark.skipif(not ON_GPU, reason="the device-side assertion needs a GPU")
def test_a_failed_value_check_on_cuda_tensors_stops_the_process_at_its_next_synchronisation():
    """No ValueError where the check is made (it would wait for the device); the process's next synchronisation
    raises, and its CUDA context stays broken: so the check runs in a process of its own. This is why the tests
    of the value checks' messages give CPU tensors."""
    script = (
        "import torch\n"
        "from seqmix.kernels.checks import check_values\n"
        "x = torch.tensor([1.0, -2.0], device='cuda')\n"
        "check_values((x > -3).all(), 'x must be > -3', lambda: 'unused')\n"
        "torch.cuda.synchronize()\n"
        "print('a passed check went through')\n"
        "check_values((x > 0).all(), 'x must be positive', lambda: 'unused')\n"
        "print('no exception where the check is made')\n"
        "torch.cuda.synchronize()\n"
        "print('no error at the synchronisation')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    out = run.stdout.splitlines()
    assert out == ["a passed check went through", "no exception where the check is made"], run.stdout + run.stderr
    assert run.returncode != 0 and "device-side assert" in run.stderr, run.stderr[-2000:]
