"""The trainer with a recurrent-depth layer: r drawn per step from (seed, step), r and k logged, the
validation bits per byte for a list of depths, also from a finished run, and the config checks."""

import json
from pathlib import Path

import pytest
import torch

from seqmix import train as trainer
from seqmix.archs.recurrent_depth import sample_depth
from tests.test_train import _config, reference_kernels, text_dir  # noqa: F401 (fixtures)

MODEL = {"layers": ["attention", "recurrent_depth", "attention"],
         "mixer_options": {"recurrent_depth": {"core": ["attention"], "mean_steps": 3, "backprop_steps": 2}}}


def _entries(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_depth_drawn_per_step_logged_and_evaluated_at_several_depths(tmp_path, text_dir):  # noqa: F811
    out = tmp_path / "run"
    config = _config(out, text_dir, model=MODEL, eval_num_steps=[1, 4])
    metrics = trainer.train(config)
    steps = [e for e in _entries(out) if "loss" in e]
    # The trainer's stream: a generator seeded by (seed, step) alone, the same in every process.
    seeds = [(config.seed * 1_000_003 + s) | (1 << 62) for s in range(6)]
    want = [sample_depth(3, 2, torch.Generator().manual_seed(seed)) for seed in seeds]
    assert [(e["num_steps"], e["backprop_steps"]) for e in steps] == want
    assert len({r for r, _ in want}) > 1, "the depth varies from step to step"
    by_depth = metrics["val_bpb_by_num_steps"]
    assert set(by_depth) == {"1", "4"} and all(0 < v < 9 for v in by_depth.values())
    assert _entries(out)[-1]["val_bpb_by_num_steps"] == by_depth

    # A finished run resumed with other depths only evaluates.
    again = trainer.train(_config(out, text_dir, model=MODEL, eval_num_steps=[2], resume=True))
    assert set(again["val_bpb_by_num_steps"]) == {"2"}
    assert len([e for e in _entries(out) if "loss" in e]) == 6


def test_eval_num_steps_is_checked(tmp_path, text_dir):  # noqa: F811
    with pytest.raises(trainer.ConfigError, match="no layer iterates"):
        trainer.train(_config(tmp_path / "a", text_dir, eval_num_steps=[2]))
    with pytest.raises(trainer.ConfigError, match="eval_num_steps must be a list of integers >= 1"):
        trainer.train(_config(tmp_path / "b", text_dir, model=MODEL, eval_num_steps=[0]))
    config = trainer.parse_args(["--model.layers", "[attention, recurrent_depth]", "--eval-num-steps", "[1, 8, 32]"])
    assert config.eval_num_steps == [1, 8, 32]
