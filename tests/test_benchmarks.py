"""The benchmarks' own arithmetic: the roofline floors match the anchors' and the error check works."""

import pytest
import torch

from benchmarks.bench_causal_conv1d import conv_floor_ms
from benchmarks.bench_delta_rule import delta_rule_floor_ms, impls, make_inputs
from benchmarks.common import max_rel_err
from tests.helpers import DEVICE


@pytest.mark.parametrize("B, T", [(8, 2048), (2, 8192)])
def test_floors_match_the_anchor_table(B, T):
    # ../shared/ANCHORS.md, bf16: delta rule (H16 D128) 0.089 / 0.268 ms, causal conv (D4096 W4) 0.089 / 0.224 ms.
    assert delta_rule_floor_ms(B, T, 16, 128, 128, 2, backward=False) == pytest.approx(0.089, abs=0.001)
    assert delta_rule_floor_ms(B, T, 16, 128, 128, 2, backward=True) == pytest.approx(0.268, abs=0.002)
    assert conv_floor_ms(B, T, 4096, 2, backward=False) == pytest.approx(0.089, abs=0.001)
    assert conv_floor_ms(B, T, 4096, 2, backward=True) == pytest.approx(0.224, abs=0.002)


def test_error_check_is_small_and_measured():
    fns = impls(["triton", "reference"])
    err = max_rel_err(fns["triton"], fns["reference"], make_inputs(1, 70, 2, 16, 16, torch.float32, True, DEVICE))
    assert 0 < err < 1e-4


def test_gated_delta_rule_error_check_is_small_and_measured():
    from benchmarks import bench_gated_delta_rule as bench

    fns = bench.impls(["triton", "reference"])
    err = max_rel_err(fns["triton"], fns["reference"], bench.make_inputs(1, 70, 2, 16, 16, torch.float32, True, DEVICE))
    assert 0 < err < 1e-4


@pytest.mark.parametrize("B, T", [(8, 2048), (2, 8192)])
def test_gla_floor_matches_the_anchor_table(B, T):
    from benchmarks.bench_gla import gla_floor_ms

    # ../shared/ANCHORS.md, bf16, fla chunk_gla (H16 D128): floor 0.112 / 0.336 ms.
    assert gla_floor_ms(B, T, 16, 128, 128, 2, backward=False) == pytest.approx(0.112, abs=0.001)
    assert gla_floor_ms(B, T, 16, 128, 128, 2, backward=True) == pytest.approx(0.336, abs=0.002)


def test_gla_error_check_is_small_and_measured():
    from benchmarks import bench_gla as bench

    fns = bench.impls(["triton", "reference"])
    err = max_rel_err(fns["triton"], fns["reference"], bench.make_inputs(1, 70, 2, 16, 16, torch.float32, True, DEVICE))
    assert 0 < err < 1e-4
