"""The benchmark's own arithmetic: the roofline floor matches the anchors' and the error check works."""

import pytest
import torch

from benchmarks.bench_delta_rule import floor_ms, triton_error
from tests.helpers import DEVICE


@pytest.mark.parametrize("B, T", [(8, 2048), (2, 8192)])
def test_floor_matches_the_anchor_table(B, T):
    # ../shared/ANCHORS.md: delta rule floor 0.089 ms forward, 0.268 ms forward+backward (bf16, H16 D128).
    assert floor_ms(B, T, 16, 128, 128, 2, backward=False) == pytest.approx(0.089, abs=0.001)
    assert floor_ms(B, T, 16, 128, 128, 2, backward=True) == pytest.approx(0.268, abs=0.002)


def test_triton_error_is_small_and_measured():
    err = triton_error(1, 70, 2, 16, 16, torch.float32, device=DEVICE)
    assert 0 < err < 1e-4
