"""The MQAR generator's semantics, the recall model's loss, and a sweep that resumes."""

import json
import math

import numpy as np
import pytest
import torch

from seqmix.bench import recall
from seqmix.bench.recall import IGNORE, RecallModel, Sweep, mqar
from seqmix.bench.results import Results

V, T, K = 32, 24, 4


def _rows(n=50, **kw):
    return mqar(n, V, T, K, seed=3, **kw)


def test_pairs_then_queries_with_the_values_as_labels():
    inputs, labels = _rows(random_filler=False)
    assert inputs.shape == labels.shape == (50, T) and inputs.dtype == labels.dtype == torch.int64
    keys, values = inputs[:, 0 : 2 * K : 2], inputs[:, 1 : 2 * K : 2]
    assert ((1 <= keys) & (keys < V // 2)).all() and ((V // 2 <= values) & (values < V)).all()
    for row in range(len(inputs)):
        assert len(set(keys[row].tolist())) == K and len(set(values[row].tolist())) == K
        pairs = dict(zip(keys[row].tolist(), values[row].tolist()))
        query_pos = (labels[row] != IGNORE).nonzero().flatten()
        # every key asked once, at an even offset after the pairs, labelled with its value
        assert len(query_pos) == K and (query_pos >= 2 * K).all() and (query_pos % 2 == 0).all()
        assert sorted(inputs[row, query_pos].tolist()) == sorted(pairs)
        assert all(pairs[int(inputs[row, p])] == int(labels[row, p]) for p in query_pos)
        filler = torch.ones(T, dtype=torch.bool)
        filler[: 2 * K] = False
        filler[query_pos] = False
        assert (inputs[row, filler] == 0).all()
        assert (labels[row, : 2 * K] == IGNORE).all()


def test_random_filler_spans_the_vocabulary_and_keeps_keys_queries_and_labels():
    plain, plain_labels = _rows(400, random_filler=False)
    filled, labels = _rows(400, random_filler=True)
    assert torch.equal(labels, plain_labels)  # the filler is drawn after everything else
    keep = labels != IGNORE
    keep[:, : 2 * K] = True
    assert torch.equal(filled[keep], plain[keep])
    filler = filled[~keep]
    assert filler.min() >= 0 and filler.max() < V and len(filler.unique()) == V


def test_seeded_and_reproducible():
    a = mqar(20, V, T, K, seed=5)
    b = mqar(20, V, T, K, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for other in (mqar(20, V, T, K, seed=6), mqar(20, V, T, K, seed=5, stream=1)):
        assert not torch.equal(a[0], other[0])
    data = recall.load_data(V, T, K, 20, 20, seed=5)
    assert torch.equal(data["train_inputs"], a[0]) and not torch.equal(data["test_inputs"], a[0])


def test_power_law_placement():
    """The first key's query gap follows p(g) ~ a (g+1)^(a-1); the second draw is p conditioned on a new gap."""
    n, t, k, a = 40_000, 32, 2, 0.01
    inputs, _ = mqar(n, V, t, k, power_a=a, random_filler=False, seed=0)
    space = (t - 2 * k) // 2
    p = a * np.arange(1, space + 1) ** (a - 1)
    p /= p.sum()
    assert np.allclose(np.exp(recall.power_law_log_weights(space, a)), p)
    first_key = inputs[:, 0:1]
    pos = (inputs[:, 2 * k :] == first_key).float().argmax(1)  # the query of key 0 (keys never appear as filler here)
    gap = (pos // 2).numpy()
    seen = np.bincount(gap, minlength=space) / n
    assert np.abs(seen - p).max() < 0.015
    gaps = np.stack([((inputs[:, 2 * k :] == inputs[:, 2 * i : 2 * i + 1]).float().argmax(1) // 2).numpy()
                     for i in range(k)], 1)
    second = np.bincount(gaps[:, 1], minlength=space) / n
    exact = np.array([sum(p[i] * p[j] / (1 - p[i]) for i in range(space) if i != j) for j in range(space)])
    assert np.abs(second - exact).max() < 0.015
    assert (gaps[:, 0] != gaps[:, 1]).all()


@pytest.mark.parametrize("args, name", [
    ({"num_examples": 0}, "num_examples"), ({"seq_len": 23}, "seq_len"), ({"num_kv_pairs": 7}, "num_kv_pairs"),
    ({"vocab_size": 8, "num_kv_pairs": 4, "seq_len": 16}, "vocab_size"), ({"power_a": 0.0}, "power_a"),
])
def test_bad_arguments_raise(args, name):
    kw = {"num_examples": 4, "vocab_size": V, "seq_len": T, "num_kv_pairs": K, **args}
    with pytest.raises(ValueError, match=name):
        mqar(**kw)


def test_loss_and_head_only_at_labelled_positions():
    torch.manual_seed(0)
    model = RecallModel(V, 16, "attention", short_conv=False, backend="reference")
    inputs, labels = mqar(3, V, T, K, seed=1)
    seen = []
    model.head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    loss, correct, count = model(inputs, labels)
    assert seen == [int((labels != IGNORE).sum())] == [count] == [3 * K]
    logits_all = model.head(model.norm(model.hidden(inputs)))
    expected = torch.nn.functional.cross_entropy(logits_all.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert int(correct) == int((logits_all.argmax(-1) == labels)[labels != IGNORE].sum())
    with pytest.raises(ValueError, match="labelled"):
        model(inputs, torch.full_like(labels, IGNORE))


def _short_convs(module):
    return [c for c in module.modules() if isinstance(c, recall.ShortConvolution)]


@pytest.mark.parametrize("name, kind", [("deltanet", "flag"), ("mamba2", "built-in"), ("attention", "in-front"),
                                        ("gla", "in-front"), ("lightconv", "in-front"), ("shortconv", "is-conv")])
def test_short_conv_on_and_off(name, kind):
    assert recall.short_conv_kind(name) == kind
    on = recall.build_recall_mixer(name, 32, True, backend="reference")
    x = torch.randn(2, 8, 32)
    assert on(x).shape == x.shape
    if kind == "is-conv":
        with pytest.raises(ValueError, match="short conv"):
            recall.build_recall_mixer(name, 32, False)
        return
    off = recall.build_recall_mixer(name, 32, False, backend="reference")
    assert _short_convs(on) and not _short_convs(off)
    assert off(x).shape == x.shape


def test_knobs_reach_the_mixers_that_have_them():
    m = recall.build_recall_mixer("mamba2", 16, True, state_size=8, options={"head_dim": 8})
    assert m.mixer.d_state == 8
    assert recall.build_recall_mixer("deltanet", 16, True, heads=2).mixer.num_heads == 2
    with pytest.raises(ValueError, match="state_size"):
        recall.build_recall_mixer("attention", 16, True, state_size=8)


def _tiny_sweep():
    return Sweep(mixers=["attention"], widths=[8], seq_kv=[(16, 2)], lrs=[1e-2, 3e-2, 1e-1], short_conv=[False],
                 vocab_size=V, num_train=16, num_test=8, epochs=1, batch_size={16: 8})


def test_sweep_resumes_without_rerunning_finished_runs(tmp_path, monkeypatch):
    trained = []
    real = recall.train_recall
    monkeypatch.setattr(recall, "train_recall", lambda run, *a: trained.append(run.key()) or real(run, *a))
    path = tmp_path / "results.jsonl"
    sweep = _tiny_sweep()
    keys = [r.key() for r in sweep.runs()]
    assert len(keys) == 3
    first = recall.run_sweep(sweep, Results(path), show_progress=False, max_runs=2, backend="reference")  # interrupted
    assert trained == keys[:2] and [r["key"] for r in first] == keys[:2]
    with open(path, "a") as f:
        f.write('{"key": "torn')  # a line cut short by a kill
    rows = recall.run_sweep(sweep, Results(path), show_progress=False, backend="reference")
    assert trained == keys  # the finished two were not trained again
    assert [r["key"] for r in rows] == keys
    stored = [json.loads(line)["key"] for line in path.read_text().splitlines() if line.endswith("}")]
    assert sorted(stored) == sorted(keys)
    assert recall.run_sweep(sweep, Results(path), show_progress=False) == rows and trained == keys
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and row["epochs_run"] == len(row["curve"]) == 1 and row["steps"] == 2
        assert math.isfinite(row["seconds"]) and row["params"] > 0


def test_early_stop_at_the_target(tmp_path):
    data = recall.load_data(V, 16, 2, 16, 8)
    run = recall.RecallRun("attention", False, 8, 16, 2, 1e-2, V, 16, 8, epochs=3, batch_size=8, target=0.0)
    row = recall.train_recall(run, data, backend="reference")
    assert row["epochs_run"] == 1 and row["steps"] == 2


def test_table_and_plot(tmp_path):
    rows = [{"mixer": m, "short_conv": c, "width": w, "seq_len": 64, "num_kv_pairs": 8, "lr": lr, "accuracy": acc,
             "steps": 10, "epochs_run": 1}
            for m, c, w, lr, acc in [("attention", True, 64, 1e-2, 0.9), ("attention", True, 64, 3e-2, 0.95),
                                     ("gla", False, 64, 1e-2, 0.2), ("gla", False, 128, 1e-2, 0.4)]]
    text = recall.table(rows)
    assert "| attention | on | 64 | 0.950 (3e-02, 1 ep) |" in text
    assert "| gla | off | 128 | 0.400 (1e-02, 1 ep) |" in text
    recall.plot(rows, tmp_path / "recall.png")
    assert (tmp_path / "recall.png").stat().st_size > 1000


def test_command_line(tmp_path, capsys):
    sweep, _ = recall.parse_args(["--preset", "zoology", "--mixers", "attention,gla", "--short-conv", "on"])
    assert sweep.vocab_size == 8192 and sweep.seq_kv == [(64, 4), (128, 8), (256, 16)]
    assert sweep.batch_size == {64: 512, 128: 512, 256: 256} and sweep.widths == [64, 128, 256, 512]
    assert len(sweep.runs()) == 2 * 3 * 4 * 4
    with pytest.raises(SystemExit):
        recall.parse_args(["--mixers", "nope"])
    recall.main(["--mixers", "attention", "--widths", "8", "--seq-kv", "16:2", "--lrs", "1e-2", "--short-conv", "off",
                 "--vocab-size", str(V), "--num-train", "8", "--num-test", "8", "--epochs", "1", "--batch-size", "8",
                 "--out", str(tmp_path), "--no-progress", "--backend", "reference"])
    assert "| attention | off | 8 |" in capsys.readouterr().out
    assert {p.name for p in tmp_path.iterdir()} == {"results.jsonl", "recall.md", "recall.png"}
