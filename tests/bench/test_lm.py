"""The equal-budget LM comparison: a smoke run with tiny steps, its table, plot and resume."""

import json

import pytest

from seqmix.bench import lm
from seqmix.bench.results import Results

TINY = ["steps=2", "eval_every=2", "log_every=1", "save_every=2", "eval_tokens=64", "seq_len=16", "batch_size=2",
        "warmup_steps=1", "model.hidden_size=16", "model.num_heads=1"]


def test_layer_configs_and_overrides():
    assert lm.parse_layers("[deltanet*3, attention]") == ["deltanet*3", "attention"]
    for bad in ("attention", "[]", "[1, 2]"):
        with pytest.raises(ValueError, match="layer config"):
            lm.parse_layers(bad)
    configs, values = lm.base_values("gpu")
    assert values["model"]["hidden_size"] == 512 and values["steps"] == 5000 and len(configs) == 4
    lm.apply_override(values, "model.num_heads=8")
    lm.apply_override(values, "lr=1e-3")
    assert values["model"]["num_heads"] == 8 and values["lr"] == 1e-3
    with pytest.raises(ValueError, match="key=value"):
        lm.apply_override(values, "steps")
    assert lm.slug("[deltanet*3, attention]") == "deltanet-3-attention"


def test_smoke_run_table_plot_and_resume(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    monkeypatch.setenv("SEQMIX_DATA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "lm"
    argv = ["--configs", "[attention*2]", "--data", str(corpus), "--out", str(out), "--no-progress",
            "--threads", "1", *[a for s in TINY for a in ("--set", s)], "--set", "device=cpu"]
    lm.main(argv)
    rows = list(Results(out / "results.jsonl").rows.values())
    assert len(rows) == 1
    row = rows[0]
    assert row["layers"] == ["attention*2"] and row["steps"] == 2 and row["params"] > 0
    assert row["val_steps"] == [2] and row["val_bpb_curve"] == [row["val_bpb"]] and row["val_bpb"] > 0
    assert row["peak_memory"] > 0 and row["tokens_per_s"] > 0 and row["val_wall"][0] == row["train_seconds"] > 0
    table = (out / "lm.md").read_text()
    assert "| [attention*2] |" in table and f"{row['val_bpb']:.4f}" in table
    assert (out / "lm.png").stat().st_size > 1000
    # a second call finds the run finished: nothing is trained (no process could be started)
    monkeypatch.setattr(lm.multiprocessing, "get_context", None)
    lm.main(argv)
    assert [json.loads(line)["key"] for line in (out / "results.jsonl").read_text().splitlines()] == [row["key"]]


def test_curves_from_the_trainer_log(tmp_path):
    log = tmp_path / "log.jsonl"
    entries = [{"step": 5, "tokens": 100, "tokens_per_s": 50.0}, {"step": 5, "val_bpb": 3.0},
               {"step": 10, "tokens": 200, "tokens_per_s": 25.0}, {"step": 10, "val_bpb": 2.5}]
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    c = lm.curves(log)
    assert c["val_steps"] == [5, 10] and c["val_bpb_curve"] == [3.0, 2.5]
    assert c["val_wall"] == [2.0, 6.0] and c["train_seconds"] == 6.0 and c["tokens_per_s"] == 200 / 6.0
