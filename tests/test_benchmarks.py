"""The benchmarks' own arithmetic: the roofline floors match the anchors' and the error check works."""

import json
import math

import pytest
import torch

from benchmarks import bench_dynamic_conv
from benchmarks.bench_causal_conv1d import conv_floor_ms
from benchmarks.bench_delta_rule import delta_rule_floor_ms, impls, make_inputs
from benchmarks.bench_ssd import impls as ssd_impls
from benchmarks.bench_ssd import make_inputs as ssd_inputs
from benchmarks.bench_ssd import make_scan_inputs, scan_floor_ms, scan_impls, ssd_floor_ms
from benchmarks.bench_train import main as bench_train
from benchmarks.common import max_rel_err
from tests.helpers import DEVICE, ON_GPU, rel_err


@pytest.mark.parametrize("B, T", [(8, 2048), (2, 8192)])
def test_floors_match_the_anchor_table(B, T):
    # docs/anchors.md, bf16: delta rule (H16 D128) 0.089 / 0.268 ms, causal conv (D4096 W4) 0.089 / 0.224 ms.
    assert delta_rule_floor_ms(B, T, 16, 128, 128, 2, backward=False) == pytest.approx(0.089, abs=0.001)
    assert delta_rule_floor_ms(B, T, 16, 128, 128, 2, backward=True) == pytest.approx(0.268, abs=0.002)
    assert conv_floor_ms(B, T, 4096, 2, backward=False) == pytest.approx(0.089, abs=0.001)
    assert conv_floor_ms(B, T, 4096, 2, backward=True) == pytest.approx(0.224, abs=0.002)


def test_error_check_is_small_and_measured():
    fns = impls(["triton", "reference"])
    err = max_rel_err(fns["triton"], fns["reference"], make_inputs(1, 70, 2, 16, 16, torch.float32, True, DEVICE))
    assert 0 < err < 1e-4


@pytest.mark.parametrize("B, T", [(8, 2048), (2, 8192)])
def test_ssd_floor_matches_the_anchor_table(B, T):
    # docs/anchors.md, bf16: mamba_ssm SSD (H64 P64 N128 G1) 0.096 / 0.288 ms.
    assert ssd_floor_ms(B, T, 64, 64, 128, 1, 2, backward=False) == pytest.approx(0.096, abs=0.001)
    assert ssd_floor_ms(B, T, 64, 64, 128, 1, 2, backward=True) == pytest.approx(0.288, abs=0.002)


def test_ssd_error_check_is_small_and_measured():
    fns = ssd_impls(["triton", "reference"])
    err = max_rel_err(fns["triton"], fns["reference"], ssd_inputs(1, 70, 2, 8, 16, 1, torch.float32, True, DEVICE))
    assert 0 < err < 1e-4


def test_selective_scan_floor_and_error_check():
    # Bandwidth only: B8 T2048 D4096 N16 bf16 moves 16384 * (4 * 4096 + 32) * 2 bytes once forward.
    assert scan_floor_ms(8, 2048, 4096, 16, 2, backward=False) == pytest.approx(16384 * 16416 * 2 / 3e9)
    fns = scan_impls(["triton", "reference"])
    err = max_rel_err(fns["triton"], fns["reference"], make_scan_inputs(1, 20, 8, 4, torch.float32, True, DEVICE))
    assert 0 < err < 1e-4


def test_training_benchmark_runs_each_model(capsys):
    rows = bench_train(["--cpu", "--layers", "attention", "deltanet,attention", "--hidden-size", "32",
                        "--num-heads", "2", "--batch", "2", "--seq-len", "32", "--steps", "1", "--warmup", "1"])
    assert [r["layers"] for r in rows] == ["attention", "deltanet,attention"]
    assert all(r["tokens_per_s"] > 0 and 4.0 < r["loss"] < 8.0 for r in rows)
    assert "deltanet,attention" in capsys.readouterr().out


def test_dynamic_conv_floor_and_error_check():
    # B8 T2048 C1024 H16 K31 bf16: (2*1024 + 496) * 2 bytes per token in the forward.
    floor = bench_dynamic_conv.dynamic_conv_floor_ms(8, 2048, 1024, 16, 31, 2, backward=False)
    assert floor == pytest.approx(16384 * 2544 * 2 / 3.0e12 * 1e3)
    fns = bench_dynamic_conv.impls(["triton", "reference"])
    inputs = bench_dynamic_conv.make_inputs(1, 40, torch.float32, True, DEVICE, channels=16, heads=2, taps=5)
    err = max_rel_err(fns["triton"], fns["reference"], inputs)
    assert 0 < err < 1e-4
    assert fns["sdpa"](*inputs).shape == inputs[0].shape


def test_gated_delta_rule_error_check_is_small_and_measured():
    from benchmarks import bench_gated_delta_rule as bench

    fns = bench.impls(["triton", "reference"])
    err = max_rel_err(fns["triton"], fns["reference"], bench.make_inputs(1, 70, 2, 16, 16, torch.float32, True, DEVICE))
    assert 0 < err < 1e-4


@pytest.mark.parametrize("B, T", [(8, 2048), (2, 8192)])
def test_gla_floor_matches_the_anchor_table(B, T):
    from benchmarks.bench_gla import gla_floor_ms

    # docs/anchors.md, bf16, fla chunk_gla (H16 D128): floor 0.112 / 0.336 ms.
    assert gla_floor_ms(B, T, 16, 128, 128, 2, backward=False) == pytest.approx(0.112, abs=0.001)
    assert gla_floor_ms(B, T, 16, 128, 128, 2, backward=True) == pytest.approx(0.336, abs=0.002)


def test_gla_error_check_is_small_and_measured():
    from benchmarks import bench_gla as bench

    fns = bench.impls(["triton", "reference"])
    err = max_rel_err(fns["triton"], fns["reference"], bench.make_inputs(1, 70, 2, 16, 16, torch.float32, True, DEVICE))
    assert 0 < err < 1e-4


def test_ssd_comparator_maps_ssd_onto_simple_gla():
    """fla's chunk_simple_gla stands in for SSD in the benchmarks: with a plain recurrence in its place, the
    mapping (q = C, k = B per head, v = dt x, log decay dt A, scale 1, plus D x) gives SSD's reference output."""
    from benchmarks.bench_ssd import _ssd_as_simple_gla

    def simple_gla(q, k, v, g, scale):
        state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=torch.float64)
        out = []
        for t in range(q.shape[1]):
            state = state * g[:, t, :, None, None].exp() + k[:, t, :, :, None] * v[:, t, :, None, :]
            out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
        return torch.stack(out, 1), state

    torch.manual_seed(0)
    inputs = [t.double() for t in ssd_inputs(2, 20, 4, 8, 16, 1, torch.float32, False, DEVICE)]
    expected = ssd_impls(["reference"])["reference"](*inputs)
    assert rel_err(_ssd_as_simple_gla(simple_gla, *inputs), expected) < 1e-10


def test_decode_benchmark_runs_each_model(capsys):
    from benchmarks import bench_decode

    rows = bench_decode.main(["--cpu", "--layers", "attention", "deltanet", "--hidden-size", "32", "--num-heads", "2",
                              "--prompt", "8", "--tokens", "2"])
    assert [r["layers"] for r in rows] == ["attention", "deltanet"]
    assert all(r["eager_ms_per_token"] > 0 for r in rows)
    assert not any("graph_error" in r for r in rows)  # attention's preallocated cache does not grow
    assert "deltanet" in capsys.readouterr().out


def test_decode_benchmark_times_generate_per_mixer(capsys):
    from benchmarks import bench_decode

    rows = bench_decode.main(["--generate", "--mixers", "deltanet", "--hidden-size", "32", "--num-heads", "2",
                              "--prompts", "4", "8", "--tokens", "2", "--repeats", "1", "--ops"])
    assert {(r["mixer"], r["prompt"]) for r in rows} == {(m, p) for m in ("attention", "deltanet") for p in (4, 8)}
    attention = [r for r in rows if r["mixer"] == "attention"]
    assert all(r["vs_attention"] == 1.0 for r in attention)
    # at these sizes the differences of two timings are noise: only that every ratio is computed
    assert all(math.isfinite(r["long_over_short"]) and len(r["samples"]) == 1 for r in rows)
    assert all(r["step_aten_calls"] > r["mixer_aten_calls"] > 0 for r in rows)
    assert "vs attention" in capsys.readouterr().out


def test_occupancy_and_opcode_counts():
    from benchmarks.sm90_report import occupancy, opcode_counts

    assert occupancy(128, 116 * 1024, 4) == (1, "shared")  # 117 KB of 228 per SM
    assert occupancy(255, 40 * 1024, 4) == (2, "regs")  # 8192 registers a warp: 8 warps per SM
    assert occupancy(32, 0, 8) == (8, "warps")
    assert occupancy(64, 228 * 1024, 4) == (0, "shared")  # over the 227 KB a block may have
    sass = """
        /*0000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0010*/              @!P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/                   FFMA R1, R2, R3, R1 ;
        /*0030*/               @P1 STL [R1], R2 ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
    """
    counts = opcode_counts(sass)
    assert (counts["total"], counts["HGMMA"], counts["HMMA"], counts["FFMA"], counts["STL"], counts["BAR"]) == (
        5, 1, 1, 1, 1, 1)


@pytest.mark.skipif(ON_GPU, reason="a rehearsal runs Triton's interpreter, which the suite turns on only without a GPU")
def test_gpu_check_rehearsal_writes_results_and_table(tmp_path, monkeypatch, capsys):
    """The quick GPU check's stages end to end on the CPU (four ops, the interpreter): results JSON, merge,
    table; the README refuses the rehearsal's numbers."""
    import json

    from benchmarks import gpu_quick, results_table

    monkeypatch.setenv("SEQMIX_AUTOTUNE", "1")  # the parity stage sets it to 0; restored after the test
    out, part = tmp_path / "out", tmp_path / "part"
    ops = ("ssd", "causal_conv1d", "segment_pool_upsample", "add_rms_norm")
    common = ["--rehearse", "--ops", ",".join(ops)]
    assert gpu_quick.main(["meta", "--out", str(out), "--rehearse"]) == 0
    assert gpu_quick.main(["parity", "--out", str(part), *common]) == 0
    assert gpu_quick.main(["merge", str(part / "results.json"), "--out", str(out)]) == 0
    assert gpu_quick.main(["bench", "--out", str(out), "--rehearse", "--ops", ",".join(("sdpa", *ops))]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["rehearsal"] and results["ceilings"]["measured"] is False
    assert [(p["op"], p["case"], p["passed"]) for p in results["parity"]] == [
        *((op, case, True) for op in ("ssd", "causal_conv1d") for case in ("train", "state", "decode")),
        ("causal_conv1d", "update", True), ("segment_pool_upsample", "train", True), ("add_rms_norm", "train", True)]
    assert set(results["parity"][1]["errors"]) == {"out", "ht", "dx", "ddt", "dA", "dB", "dC", "dD", "dbias", "dh0"}
    assert set(results["parity"][-2]["errors"]) == {"out", "dx", "db", "dnull"}
    assert set(results["parity"][-1]["errors"]) == {"out", "dx", "dresidual", "dweight"}
    # (the conv's final state is a copy of its last inputs: exactly equal, so some errors are 0)
    assert all(0 < p["max_error"] < 1e-4 and min(p["errors"].values()) >= 0 for p in results["parity"])
    assert {(r["op"], r["mode"]) for r in results["bench"]} == {
        (op, mode) for op in ("sdpa", *ops) for mode in ("fwd", "fwd+bwd")}
    assert {r["impl"] for r in results["bench"] if r["op"] in ops[2:]} == {"triton", "dense", "torch"}
    table = results_table.text(results)
    assert table.startswith("REHEARSAL") and "causal_conv1d" in table
    with pytest.raises(SystemExit, match="rehearsal"):
        results_table.update_readme(tmp_path / "README.md", results, "x.json")
    results["meta"]["rehearsal"] = False
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results_table.BEGIN}\nold\n{results_table.END}\noutro\n")
    results_table.update_readme(readme, results, "x.json")
    text = readme.read_text()
    assert "old" not in text and "| ssd | triton |" in text and text.endswith("outro\n")


def test_gpu_check_tests_stage_keeps_each_failure_as_it_happens(tmp_path):
    """The GPU check's tests stage: tests/conftest.py writes each failure's traceback to failures.log during the
    run, and the results name the failed tests (a suite stopped at its time limit keeps both)."""
    import json

    from benchmarks import gpu_quick

    suite = tmp_path / "test_two.py"
    suite.write_text("def test_fails():\n    assert 2 + 2 == 5, 'arithmetic'\n\n\ndef test_passes():\n    pass\n")
    out = tmp_path / "out"
    rehearse = [] if ON_GPU else ["--rehearse"]  # (a rehearsal needs the interpreter, on only without a GPU)
    gpu_quick.main(["tests", "--out", str(out), *rehearse, "--seconds", "120",
                    "--pytest-args", "-p", "tests.conftest", "--rootdir", str(tmp_path), str(suite)])
    tests = json.loads((out / "results.json").read_text())["tests"]
    assert tests["exit"] == 1 and tests["failed"] == ["test_two.py::test_fails"], tests
    log = (out / "failures.log").read_text()
    assert "AssertionError: arithmetic" in log and "test_passes" not in log


def test_gpu_check_script_parses():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
def test_pooling_benchmark_compares_equal_functions(capsys):
    """The dense einsum form the pooling benchmark times computes the ops' output and x gradient; the op part
    runs on the CPU; the LM part compares same-depth models (2 + 8 + 2 against 12 layers)."""
    from benchmarks.bench_pooling import dense_pool_upsample, lm_configs, main, seqmix_pool_upsample

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 8, generator=g, dtype=torch.float64)
    b = (torch.rand(2, 40, generator=g) < 0.3).double()
    null = torch.randn(1, 1, 8, generator=g, dtype=torch.float64)
    grads = []
    for fn in (dense_pool_upsample, seqmix_pool_upsample("reference")):
        xr = x.clone().requires_grad_()
        out = fn(xr, b, null)
        out.square().sum().backward()
        grads.append((out.detach(), xr.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    rows = main(["op", "--device", "cpu", "--size", "2", "64", "16", "--reps", "1"])["op"]
    assert {r["impl"] for r in rows} == {"dense", "reference"} and all(r["ms"] > 0 for r in rows)
    assert "dense/this" in capsys.readouterr().out
    args = type("Args", (), {"prior": 0.2, "modes": ["fixed", "hnet"]})()
    configs = lm_configs(args)
    assert configs["full-length x12"]["layers"] == ["attention*12"]
    hourglass = configs["hourglass hnet"]["mixer_options"]["hourglass"]
    assert hourglass["layers"] == ["attention*8"] and hourglass["boundary"] == "hnet" and hourglass["stride"] == 5


def test_pooling_and_norm_floors_and_norm_comparator():
    """The floors of the two anchors added for pooling and add_rms_norm, and the unfused add + RMSNorm the norm is
    timed against computes the op's output and gradients."""
    from benchmarks import bench_recurrent_depth as rd
    from benchmarks.bench_pooling import pool_floor_ms

    # B8 T2048 D1024 bf16, 20% boundaries: 2 token rows + 2 segment rows (0.2 each) forward, 5 + 6 with the backward.
    assert pool_floor_ms(8, 2048, 1024, 0.2, 2, backward=False) == pytest.approx(16384 * 1024 * 2 * 2.4 / 3e9)
    assert pool_floor_ms(8, 2048, 1024, 0.2, 2, backward=True) == pytest.approx(16384 * 1024 * 2 * 6.2 / 3e9)
    # B8 T2048 D4096 bf16: 3 tensors forward (x, residual, normed), 7 with the backward.
    assert rd.norm_floor_ms(8, 2048, 4096, 2, backward=False) == pytest.approx(16384 * 4096 * 2 * 3 / 3e9)
    assert rd.norm_floor_ms(8, 2048, 4096, 2, backward=True) == pytest.approx(16384 * 4096 * 2 * 7 / 3e9)
    fns = rd.norm_impls(["reference"])
    inputs = rd.make_norm_inputs(2, 8, 40, torch.float32, True, DEVICE)
    assert max_rel_err(fns["torch"], fns["reference"], inputs) < 1e-6


def test_cpu_benchmark_times_each_mixer_and_writes_json(tmp_path, capsys):
    from benchmarks.bench_cpu import main as bench_cpu

    out = tmp_path / "cpu.json"
    rows = bench_cpu(["--mixers", "attention", "mamba", "--train-shapes", "2x16", "--prompts", "4",
                      "--repeats", "1", "--new-tokens", "3", "--out", str(out)])
    assert [r["mixer"] for r in rows] == ["attention", "mamba"]
    assert all(r["train"]["B2T16"] > 0 and "prompt4" in r["decode"] for r in rows)
    assert [r["mixer"] for r in json.loads(out.read_text())["rows"]] == ["attention", "mamba"]
    assert "(1.00x)" in capsys.readouterr().out


def test_cpu_benchmark_matches_each_mixer_with_an_attention_lm_of_its_size(capsys):
    """``--matched-attention`` adds an attention LM widened to the mixer's parameter count (SwiGLU widths in
    steps of 16: within half a step, 16 x 3 x hidden x layers / 2 parameters) and prints the mixer's ratios to it."""
    from benchmarks.bench_cpu import HIDDEN, LAYERS
    from benchmarks.bench_cpu import main as bench_cpu

    rows = bench_cpu(["--mixers", "attention", "mamba2", "--train-shapes", "2x16", "--prompts", "4",
                      "--repeats", "1", "--new-tokens", "3", "--matched-attention"])
    mamba2, twin = rows[1], rows[2]
    assert twin["matches"] == "mamba2" and twin["mixer"].startswith("attention, ff ")
    assert twin["params_M"] > rows[0]["params_M"]
    assert abs(twin["params_M"] - mamba2["params_M"]) * 1e6 <= 16 * 3 * HIDDEN * LAYERS / 2
    assert twin["train"]["B2T16"] > 0 and twin["decode"]["prompt4"] > 0
    assert f"mamba2 ({mamba2['params_M']:.3f}M) to {twin['mixer']}" in capsys.readouterr().out


def test_cpu_benchmark_times_compiled_decoding(monkeypatch, capsys):
    """``--compile`` adds generate(compile=True)'s ms/token and compile seconds per seqmix model and prompt
    (Dynamo's eager backend here: the trace without inductor's compile time)."""
    import torch

    from benchmarks.bench_cpu import main as bench_cpu

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "eager"}))
    rows = bench_cpu(["--mixers", "attention", "shortconv", "--no-train", "--prompts", "4", "--repeats", "1",
                      "--new-tokens", "3", "--compile"])
    assert all(set(r["decode_compiled"]) == set(r["compile_s"]) == {"prompt4"} for r in rows)
    assert "compiled prompt4 ms/tok" in capsys.readouterr().out
