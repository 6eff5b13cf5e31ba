"""The benchmarks' own arithmetic: the roofline floors match the anchors' and the error check works."""

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
from tests.helpers import DEVICE


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
