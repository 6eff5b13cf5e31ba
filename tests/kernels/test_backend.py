"""Backend choice: named backends serve or say why; SEQMIX_BACKEND steers the automatic choice; every choice
can be seen (explain, recording, the seqmix.kernels DEBUG log)."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import seqmix.kernels.deltanet as deltanet_family
from seqmix.kernels import cpu as cpu_build
from seqmix.kernels import BackendUnavailable, delta_rule, dynamic_conv
from seqmix.kernels.backend import explain, recording, select_backend, triton_interpreting
from tests.helpers import ON_GPU

CPU = torch.device("cpu")


def test_automatic_choice_follows_the_device(monkeypatch):
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    impl = ("triton", "reference")
    if ON_GPU:
        assert select_backend("op", None, torch.device("cuda"), impl) == "triton"
    expected_cpu = "triton" if triton_interpreting() else "reference"
    assert select_backend("op", None, CPU, impl) == expected_cpu
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend("op", None, CPU, impl) == "reference"


def test_named_backend_that_cannot_serve_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="Triton kernels need CUDA tensors"):
        select_backend("op", "triton", CPU, ("triton", "reference"))
    with pytest.raises(BackendUnavailable, match="op has no 'cuda' backend"):
        select_backend("op", "cuda", CPU, ("triton", "reference"))
    with pytest.raises(BackendUnavailable, match="CUDA extension needs CUDA tensors"):
        select_backend("op", "cuda", CPU, ("cuda", "reference"))
    with pytest.raises(ValueError, match="backend must be one of"):
        select_backend("op", "tpu", CPU, ("reference",))


def test_environment_override(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SEQMIX_BACKEND", "reference")
    assert select_backend("op", None, CPU, ("triton", "reference")) == "reference"
    # An op without the named backend keeps its automatic choice ...
    monkeypatch.setenv("SEQMIX_BACKEND", "cuda")
    assert select_backend("op", None, CPU, ("triton", "reference")) == "triton"
    # ... one that has it must serve the call with it.
    with pytest.raises(BackendUnavailable, match="'cuda' cannot serve"):
        select_backend("op", None, CPU, ("cuda", "reference"))
    # The argument wins over the environment.
    assert select_backend("op", "triton", CPU, ("cuda", "triton", "reference")) == "triton"
    monkeypatch.setenv("SEQMIX_BACKEND", "fast")
    with pytest.raises(ValueError, match="SEQMIX_BACKEND must be one of"):
        select_backend("op", None, CPU, ("reference",))


def test_call_limits_skip_a_backend_automatically_and_refuse_it_by_name(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)
    limits = {"triton": "x must be float16, bfloat16 or float32, got torch.float64"}
    assert select_backend("op", None, CPU, ("triton", "reference"), limits) == "reference"
    with pytest.raises(BackendUnavailable, match="'triton' cannot serve this call: x must be"):
        select_backend("op", "triton", CPU, ("triton", "reference"), limits)
    assert select_backend("op", None, CPU, ("triton", "reference"), {"triton": None}) == "triton"


def _delta_rule_inputs(dtype=torch.float32, device=CPU):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 16, generator=g, dtype=dtype) for _ in range(3))
    beta = torch.rand(1, 8, 2, generator=g, dtype=dtype)
    return [t.to(device) for t in (q, F.normalize(k, dim=-1), v, beta)]


def test_explain_reports_the_choice_and_why_without_running_the_op(monkeypatch):
    monkeypatch.delenv("SEQMIX_BACKEND", raising=False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("explain ran the op")

    monkeypatch.setattr(deltanet_family, "delta_rule_chunked", must_not_run)
    # The C++ CPU kernels as on a fresh checkout (not compiled): the choice does not depend on an earlier build.
    monkeypatch.setattr(cpu_build, "ready", lambda: False)
    not_compiled = "cpu: the C++ CPU kernels are not compiled here yet (python -m seqmix.kernels.build compiles them)"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    choice = explain("delta_rule", *_delta_rule_inputs())
    assert (choice.op, choice.backend, str(choice)) == (
        "delta_rule", "reference", f"delta_rule: reference (CPU tensors; {not_compiled})")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert str(explain(delta_rule, *_delta_rule_inputs())) == f"delta_rule: triton ({not_compiled})"
    assert str(explain(delta_rule, *_delta_rule_inputs(torch.float64))) == (
        f"delta_rule: reference ({not_compiled}; triton does not take this call: q, k, v, beta must be float16, "
        "bfloat16 or float32, got torch.float64)")
    assert explain(delta_rule, *_delta_rule_inputs(), backend="reference").reason == "asked for with backend='reference'"
    monkeypatch.setenv("SEQMIX_BACKEND", "reference")
    assert explain(delta_rule, *_delta_rule_inputs()).reason == "SEQMIX_BACKEND=reference"
    if ON_GPU:
        monkeypatch.delenv("SEQMIX_BACKEND")
        assert str(explain(delta_rule, *_delta_rule_inputs(device=torch.device("cuda")))) == \
            "delta_rule: triton (CUDA tensors)"


def test_explain_checks_the_inputs_and_leaves_the_generator_alone(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, beta = _delta_rule_inputs()
    with pytest.raises(ValueError, match="beta"):
        explain(delta_rule, q, k, v, beta[:, :4])
    with pytest.raises(BackendUnavailable, match="Triton kernels need CUDA tensors"):
        explain(delta_rule, q, k, v, beta, backend="triton")
    with pytest.raises(ValueError, match="no op named 'delta_rules' in seqmix.kernels"):
        explain("delta_rules", q, k, v, beta)
    with pytest.raises(ValueError, match="returned without choosing a backend"):
        explain(lambda: None)
    # dynamic_conv draws its DropConnect seed before choosing: explain puts the generator back.
    x, weight = torch.randn(1, 5, 4), torch.randn(1, 5, 2, 3)
    before = torch.get_rng_state()
    assert explain(dynamic_conv, x, weight, dropconnect=0.5).backend == "reference"
    assert torch.equal(torch.get_rng_state(), before)


def test_recording_and_debug_logging_see_every_choice(monkeypatch, caplog):
    monkeypatch.setenv("SEQMIX_BACKEND", "reference")
    inputs = _delta_rule_inputs()
    with caplog.at_level(logging.WARNING, logger="seqmix.kernels"):
        delta_rule(*inputs)
    assert caplog.records == []  # off by default
    with recording() as choices, caplog.at_level(logging.DEBUG, logger="seqmix.kernels"):
        delta_rule(*inputs)
        dynamic_conv(torch.randn(1, 5, 4), torch.randn(1, 5, 2, 3))
    assert [str(c) for c in choices] == ["delta_rule: reference (SEQMIX_BACKEND=reference)",
                                         "dynamic_conv: reference (SEQMIX_BACKEND=reference)"]
    assert [r.getMessage() for r in caplog.records] == [str(c) for c in choices]
    assert all(r.name == "seqmix.kernels" and r.levelno == logging.DEBUG for r in caplog.records)


# Every registered mixer trained a step (AdamW's included) and decoding on the CPU, then the Triton backend asked
# for by name; with `block`, as on a machine without Triton (an import of it fails).
_WITHOUT_TRITON = """
import sys
if {block}:
    sys.modules["triton"] = None
import torch
import torch.nn.functional as F
from seqmix.archs import MIXERS
from seqmix.archs.lm import LanguageModel, LMConfig
from seqmix.kernels import BackendUnavailable, explain, gla

print("triton imported with seqmix:", sys.modules.get("triton") is not None)
OPTIONS = {{"hourglass": {{"layers": ["attention"]}}, "recurrent_depth": {{"core": ["mamba2"], "mean_steps": 2}}}}
torch.manual_seed(0)
for name in sorted(MIXERS):
    options = {{name: OPTIONS.get(name, {{}})}}
    model = LanguageModel(LMConfig(hidden_size=32, num_heads=2, layers=[name], mixer_options=options))
    tokens = torch.randint(0, 256, (2, 24))
    logits, _ = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    torch.optim.AdamW(model.parameters()).step()  # imports torch._dynamo, which walks sys.modules
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad), name
    assert model.eval().generate(tokens[:1, :8], 4, temperature=0.0).shape == (1, 12), name
q, k, v = torch.randn(3, 1, 8, 2, 16).unbind(0)
g = -torch.rand(1, 8, 2, 16)
try:
    gla(q, k, v, g, backend="triton")
except BackendUnavailable as e:
    print("refused:", e)
else:
    print("refused: nothing")
print("choice:", explain(gla, q, k, v, g).passed_over)
print("seqmix's Triton modules loaded:", sorted(m for m in sys.modules if m.startswith("seqmix") and "triton" in m))
"""


@pytest.mark.parametrize("block", [False, True], ids=["installed", "not-installed"])
def test_cpu_work_never_loads_triton_and_runs_without_it(block):
    """Importing seqmix does not import Triton, training and decoding every mixer on the CPU loads none of seqmix's
    Triton modules (torch's optimizer imports Triton itself where it is installed), and neither needs it installed:
    each family loads its Triton kernels at its first Triton call (seqmix/kernels/triton_limits.py), which without
    Triton is refused with the reason (asked for by name) or passed over (TRITON_INTERPRET=1, the automatic
    choice)."""
    env = {**os.environ, "TRITON_INTERPRET": "1" if block else "0"}
    out = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON.format(block=block)], capture_output=True, text=True,
                         timeout=600, env=env, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stdout + out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    assert lines["triton imported with seqmix"] == "False"
    assert lines["seqmix's Triton modules loaded"] == "['seqmix.kernels.triton_limits']"
    if block:
        assert "backend 'triton' cannot serve this call: triton is not installed" in lines["refused"]
        assert lines["choice"] == "(('triton', 'triton is not installed', False),)"
    else:
        assert "Triton kernels need CUDA tensors" in lines["refused"]
        assert "Triton kernels need CUDA tensors" in lines["choice"]
