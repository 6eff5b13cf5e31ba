"""The trainer: learning on the default corpus, resume = uninterrupted, extending a run, atomic checkpoints,
DDP on two CPU processes, every mixer trains, the command line (help, bad values refused with exit status 2
before anything is trained or written) and the banner (token cache, backends)."""

import itertools
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from seqmix import train as trainer
from seqmix.archs import MIXERS
from seqmix.archs.lm import LanguageModel, LMConfig

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    # These tests are about the trainer; the kernels' parity is tested in tests/kernels. Without a
    # GPU the automatic backend would be Triton's interpreter, which is far too slow to train with.
    monkeypatch.setenv("SEQMIX_BACKEND", "reference")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    for path in sorted(STDLIB.glob("*.py"))[:40]:
        (root / path.name).write_bytes(path.read_bytes())
    return root


def _config(out_dir, data, **overrides):
    values = {
        "model": {"hidden_size": 32, "num_heads": 2, "layers": ["deltanet", "attention"]},
        "data": None if data is None else str(data), "out_dir": str(out_dir), "seq_len": 32, "batch_size": 4,
        "steps": 6, "warmup_steps": 2, "eval_every": 3, "eval_tokens": 256, "save_every": 3, "log_every": 1,
        "progress": False, "device": "cpu",  # the trainer's logic: on the CPU wherever the suite runs
    }
    model = overrides.pop("model", {})
    values.update(overrides)
    values["model"].update(model)
    return trainer.config_from_dict(values)


def _losses(out_dir):
    return [e["loss"] for e in map(json.loads, (Path(out_dir) / "log.jsonl").read_text().splitlines()) if "loss" in e]


@pytest.mark.slow
def test_loss_decreases_on_the_default_corpus(tmp_path):
    config = _config(tmp_path / "run", None, steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5,
                     eval_every=40, eval_tokens=4096, save_every=40, log_every=5)
    metrics = trainer.train(config)
    losses = _losses(tmp_path / "run")
    assert losses[-1] < losses[0] - 1.0, losses  # from ~5.8 nats (uniform) to well below
    assert metrics["val_bpb"] < 6.0  # uniform over the vocabulary would be log2(320) = 8.3 bits
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    model = LanguageModel.from_pretrained(tmp_path / "run" / "model")
    assert model.config.layers == ["deltanet", "attention"]


def test_resume_continues_bit_for_bit(tmp_path, text_dir, monkeypatch):
    whole = tmp_path / "whole"
    trainer.train(_config(whole, text_dir))

    interrupted = tmp_path / "interrupted"
    real_save = trainer.save_checkpoint

    def save_then_die(path, model, optimizer, step, *args):
        real_save(path, model, optimizer, step, *args)
        if step == 3:
            raise KeyboardInterrupt("killed after the step-3 checkpoint")

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_config(interrupted, text_dir))
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    trainer.train(_config(interrupted, text_dir, resume=True))

    assert _losses(interrupted) == _losses(whole) and len(_losses(whole)) == 6
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path, text_dir, monkeypatch):
    out = tmp_path / "run"
    trainer.train(_config(out, text_dir, steps=3))
    before = (out / "checkpoint.pt").read_bytes()

    def dies_halfway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dies_halfway)
    model = LanguageModel(_config(out, text_dir).model)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(out / "checkpoint.pt", model, torch.optim.AdamW(model.parameters()), 9,
                                _config(out, text_dir, steps=3), torch.device("cpu"), [(0, 3)])
    assert (out / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "log.jsonl", "loss.png", "model"]


# Mixers whose defaults are too slow to train here (recurrent_depth: r ~ 32 iterations of four attention blocks).
SMALL_OPTIONS = {"recurrent_depth": {"core": ["attention"], "mean_steps": 3, "backprop_steps": 2}}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_trains(tmp_path, text_dir, name):
    options = {name: SMALL_OPTIONS[name]} if name in SMALL_OPTIONS else {}
    config = _config(tmp_path / name, text_dir, model={"layers": [name, name], "mixer_options": options}, steps=8,
                     lr=1e-2, eval_every=8, save_every=8)
    trainer.train(config)
    losses = _losses(tmp_path / name)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, text_dir):
    def run(nproc, out, grad_accum):
        args = ["--grad-accum", str(grad_accum), "--data", str(text_dir), "--out-dir", str(out), "--model.hidden-size", "32", "--model.num-heads", "2",
                "--model.layers", "[deltanet, attention]", "--seq-len", "32", "--batch-size", "4", "--steps", "3",
                "--log-every", "1", "--eval-every", "3", "--eval-tokens", "256", "--progress", "false",
                "--device", "cpu"]
        logs = out.with_name(out.name + "-logs")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                    "--master-port", str(29500 + nproc + os.getpid() % 1000), "--log-dir", str(logs), "--redirects", "3"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SEQMIX_BACKEND": "reference", "PYTHONFAULTHANDLER": "1"}
        done = subprocess.run([*launcher, "-m", "seqmix.train", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        ranks = "".join(f"--- {f.relative_to(logs)}\n{f.read_text()[-2000:]}\n" for f in sorted(logs.rglob("std*.log")))
        assert done.returncode == 0, ranks + done.stderr[-2000:]
        return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    # 2 processes x 2 accumulation steps x 1 sequence: DDP's no_sync path included
    one, two = run(1, tmp_path / "one", 1), run(2, tmp_path / "two", 2)
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "val_bpb"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(tmp_path, text_dir):
    trainer.train(_config(tmp_path / "one", text_dir, steps=3))
    trainer.train(_config(tmp_path / "four", text_dir, steps=3, grad_accum=4))
    assert _losses(tmp_path / "four") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)


def test_the_optimizer_is_fused_on_the_cpu(tmp_path):
    # torch's CPU default runs AdamW tensor by tensor: 8x the fused step's time on the tiny LM (docs/design.md).
    config = _config(tmp_path, None)
    assert trainer._optimizer(LanguageModel(config.model), config, torch.device("cpu")).defaults["fused"]


def test_weight_decay_skips_exactly_the_marked_parameters(tmp_path):
    config = _config(tmp_path, None, model={"hidden_size": 32, "layers": sorted(MIXERS)})
    model = LanguageModel(config.model)
    decay, no_decay = trainer._optimizer(model, config, torch.device("cpu")).param_groups
    assert decay["weight_decay"] == config.weight_decay > 0 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert skipped == {n for n, p in model.named_parameters() if getattr(p, "no_weight_decay", False)}
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - skipped
    # Every norm weight, bias and per-channel parameter is marked, and Mamba's 2-D A_log as well.
    assert skipped >= {n for n, p in model.named_parameters() if p.dim() < 2}
    two_dim = {n for n in skipped if model.get_parameter(n).dim() == 2}
    assert two_dim and all(n.endswith("mixer.A_log") for n in two_dim)
    for part in ("A_log", "dt_bias", ".D", "norm.weight", "bias"):
        assert any(n.endswith(part) for n in skipped), part


def test_bad_runs_are_refused_before_anything_is_written(tmp_path, text_dir):
    out = tmp_path / "run"
    with pytest.raises(trainer.ConfigError, match="not a file or directory"):
        trainer.train(_config(out, tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(trainer.ConfigError, match="no UTF-8 text files"):
        trainer.train(_config(out, tmp_path / "empty"))
    with pytest.raises(trainer.ConfigError, match="unknown mixer"):
        trainer.train(_config(out, text_dir, model={"layers": ["deltanet", "transformer"]}))
    with pytest.raises(trainer.ConfigError, match="not divisible by num_heads"):
        trainer.train(_config(out, text_dir, model={"num_heads": 3}))
    with pytest.raises(trainer.ConfigError, match="batch_size=4 must divide evenly"):
        trainer.train(_config(out, text_dir, grad_accum=3))
    with pytest.raises(trainer.ConfigError, match="does not exist"):
        trainer.train(_config(out, text_dir, resume=True))
    assert not out.exists()

    trainer.train(_config(out, text_dir, steps=3))
    saved = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(trainer.ConfigError, match="already holds a run"):
        trainer.train(_config(out, text_dir, steps=3))
    with pytest.raises(trainer.ConfigError, match=r"another config \(model.hidden_size: checkpoint 32, now 64"):
        trainer.train(_config(out, text_dir, steps=3, resume=True, model={"hidden_size": 64}))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == saved


def test_command_line(tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model:\n  hidden_size: 64\n  layers: [attention]\nsteps: 7\nlr: 1.0e-3\n")
    config = trainer.parse_args(["--config", str(config_file), "--steps", "9", "--model.layers", "[deltanet*2, attention]",
                                 "--resume"])
    assert (config.steps, config.lr, config.model.hidden_size) == (9, 1e-3, 64)
    assert config.model.layers == ["deltanet", "deltanet", "attention"] and config.resume
    assert trainer.parse_args(["--config", "tiny"]).model.layers == ["deltanet", "deltanet", "attention"]
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"model": {"layers": ["attention*2"]}, "seq_len": 48}))
    from_json = trainer.parse_args(["--config", str(json_file)])
    assert (from_json.seq_len, from_json.model.layers) == (48, ["attention", "attention"])
    with pytest.raises(trainer.ConfigError, match=r"unknown config key\(s\) \['model.hiden_size'\]"):
        trainer.config_from_dict({"model": {"hiden_size": 3}})
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(["--config", str(config_file), "--data", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "seqmix-train: error: data" in capsys.readouterr().err


def test_auxiliary_losses_are_trained_and_logged(tmp_path, text_dir):
    """An hourglass's boundary loss joins the LM loss; the log has it, the boundary rate and the mean segment
    length beside the LM loss (which stays the cross-entropy alone)."""
    config = _config(tmp_path / "aux", text_dir, model={"layers": ["attention", "hourglass"],
                                                         "mixer_options": {"hourglass": {"layers": ["attention"]}}},
                     steps=2, eval_every=2, save_every=2)
    trainer.train(config)
    logged = [e for e in map(json.loads, (tmp_path / "aux" / "log.jsonl").read_text().splitlines()) if "loss" in e]
    for entry in logged:
        assert {"aux_loss", "layer1.boundary_loss", "layer1.boundary_rate", "layer1.mean_segment_length"} <= set(entry)
        assert entry["aux_loss"] > 0 and 0 <= entry["layer1.boundary_rate"] <= 1


def test_help_lists_every_flag_with_its_default_the_mixers_and_the_bundled_configs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in [*trainer._fields(trainer.TrainConfig).values(), *trainer._fields(LMConfig).values()]:
        if f.name != "model":
            assert ("--model." if f.name in trainer._fields(LMConfig) else "--") + f.name.replace("_", "-") in text
            assert " ".join(f.metadata["help"].split()) in text, f.name
    assert "--lr VALUE peak learning rate (AdamW), reached after the warmup; a number (default: 0.003)" in text
    assert "(default: [deltanet, deltanet, deltanet, deltanet])" in text
    for name in MIXERS:
        assert f" {name} " in text, name
    assert "mamba d_state, expand," in text  # a mixer's options
    assert "tiny A tiny hybrid byte-level LM" in text and "gpu-50m ~50M-parameter" in text
    assert "$SEQMIX_CACHE" in text and "--resume with a larger --steps extends a run" in text


def _refused(argv, tmp_path, capsys):
    """Run the command line on argv; it must exit with status 2 and write nothing. Returns stderr."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        trainer.main([*argv, "--out-dir", str(out), "--progress", "false"])
    assert exit_info.value.code == 2
    assert not out.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--lr", "abc"], "lr (--lr) must be a number, got 'abc'"),
    (["--steps", "2.5"], "steps (--steps) must be an integer, got 2.5"),
    (["--compile", "maybe"], "compile (--compile) must be true or false, got 'maybe'"),
    (["--device", "cuda:x"], "device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--model.layers", "mamba", "--model.mixer-options", "{mamba: {d_stat: 8}}"],
     "model: mixer_options['mamba']: Mamba takes no option(s) ['d_stat']; its options are ['d_state', 'expand',"),
    (["--model.layers", "mamba", "--model.mixer-options", "{mamba: {d_state: abc}}"],
     "model.mixer_options.mamba.d_state must be an integer, got 'abc'"),
    (["--model.layers", "mamba", "--model.mixer-options", "{mamba: {expand: 0}}"], "model: expand * hidden_size"),
    (["--model.mixer-options", "{mamba: {d_state: 8"], "argument --model.mixer-options: not valid YAML"),
    (["--model.layers", "deltanet,transformer"], "model: layers: unknown mixer name(s) ['transformer']; registered: ['attention',"),
    (["--model.layers", "deltanet*x"], "model: layers: 'deltanet*x' must be a mixer name or 'name*count'"),
    (["--model.layers", "[]"], "model: layers is empty"),
    (["--beta2", "1.5"], "beta1 and beta2 must be in [0, 1)"),
    (["--config", "nope"], "--config 'nope': no such file (bundled configs: ['gpu-50m', 'tiny'])"),
])
def test_bad_values_exit_with_status_2_before_anything_is_written(argv, message, tmp_path, capsys):
    err = _refused(argv, tmp_path, capsys)
    assert f"seqmix-train: error: {message}" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_gpu_device_without_a_gpu_is_refused(tmp_path, capsys):
    err = _refused(["--device", "cuda"], tmp_path, capsys)
    assert "seqmix-train: error: device 'cuda': torch sees no CUDA GPU on this machine" in err


def test_layers_as_a_name_a_comma_list_or_a_yaml_list_and_numbers_as_yaml_strings():
    for value, layers in (("deltanet", ["deltanet"]), ("deltanet,attention*2", ["deltanet", "attention", "attention"]),
                          ("[deltanet*2, attention]", ["deltanet", "deltanet", "attention"])):
        assert trainer.parse_args(["--model.layers", value]).model.layers == layers
    config = trainer.parse_args(["--lr", "1e-3", "--min-lr", "0", "--model.norm-eps", "1e-6"])
    assert (config.lr, config.min_lr, config.model.norm_eps) == (1e-3, 0.0, 1e-6)  # YAML reads 1e-3 as a string
    assert isinstance(config.min_lr, float)


def test_resume_extends_a_run_deterministically(tmp_path, text_dir, monkeypatch, capsys):
    """--resume --steps 5 on a finished 3-step run trains steps 4-5 at min_lr (the cosine had reached it), and an
    extension interrupted half-way and resumed gives the same run bit for bit (the schedule is in the checkpoint)."""
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        trainer.train(_config(out, text_dir, steps=3))
    trainer.train(_config(first, text_dir, steps=5, resume=True))
    assert "extending the run to 5 steps" in capsys.readouterr().out

    real_save = trainer.save_checkpoint

    def save_then_die(path, model, optimizer, step, *args):
        real_save(path, model, optimizer, step, *args)
        if step == 4:
            raise KeyboardInterrupt("killed after the step-4 checkpoint")

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_config(second, text_dir, steps=5, save_every=1, resume=True))
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    trainer.train(_config(second, text_dir, steps=5, resume=True))

    entries = [e for e in map(json.loads, (first / "log.jsonl").read_text().splitlines()) if "loss" in e]
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5]
    assert [e["lr"] for e in entries[3:]] == [_config(first, text_dir).min_lr] * 2
    assert _losses(second) == _losses(first)
    a, b = (torch.load(out / "checkpoint.pt", weights_only=True) for out in (first, second))
    assert a["step"] == b["step"] == 5 and a["schedule"] == b["schedule"] == [[0, 3], [3, 5]]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_an_extended_schedule_continues_from_the_learning_rate_reached():
    config = _config("unused", None, steps=10, warmup_steps=2, lr=1.0, min_lr=0.1)
    schedule = [(0, 10), (5, 20)]
    lrs = [trainer.lr_at(config, step, schedule) for step in range(20)]
    assert lrs[:5] == [trainer.lr_at(config, step) for step in range(5)]  # as before, up to the extension
    assert lrs[5] == trainer.lr_at(config, 5)  # no jump where it is extended
    assert all(a > b for a, b in itertools.pairwise(lrs[5:]))  # then down, slower ...
    assert lrs[9] > trainer.lr_at(config, 9) and trainer.lr_at(config, 20, schedule) == pytest.approx(0.1)  # to min_lr
    # A finished run has reached min_lr and stays there.
    assert [trainer.lr_at(config, s, [(0, 10), (10, 15)]) for s in range(10, 15)] == [0.1] * 5


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path, text_dir, capsys):
    out = tmp_path / "run"
    trainer.train(_config(out, text_dir, steps=3))
    saved = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    metrics = trainer.train(_config(out, text_dir, steps=3, resume=True))
    assert f"the run in {out} finished at step 3 (steps=3); nothing to train" in capsys.readouterr().out
    assert metrics["step"] == 3 and metrics["val_bpb"] > 0
    with pytest.raises(trainer.ConfigError, match=r"checkpoint.pt is at step 3, past steps=2; give --steps 3"):
        trainer.train(_config(out, text_dir, steps=2, resume=True))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == saved


def test_the_banner_names_the_token_cache_and_each_layers_backends(tmp_path, text_dir, monkeypatch, capsys):
    monkeypatch.setenv("SEQMIX_CACHE", str(tmp_path / "cache"))
    trainer.train(_config(tmp_path / "run", text_dir, steps=1))
    out = capsys.readouterr().out
    assert f"token cache {tmp_path / 'cache'}" in out and any((tmp_path / "cache").iterdir())
    assert "backends on cpu" in out
    assert "layer 0 deltanet: causal_conv1d, delta_rule, swiglu -> reference (SEQMIX_BACKEND=reference)" in out
    assert ("layer 1 attention: rotate_halves x2, swiglu -> reference (SEQMIX_BACKEND=reference); "
            "attention -> sdpa (CPU tensors)") in out


# Five 8 MB tensors made and freed a step; the page faults of ten steps after four. By default glibc gives such
# blocks back to the kernel (through mmap, or by trimming its heap's top), so each step faults its tensors in again:
# about 7K pages a step here, in most fresh processes. Not in all: in 1 to 4 of 8, some allocation of torch's
# lands above the freed tensors in the first steps and pins them, and then nothing faults. Which happens is a
# race, so the test does not assert the default; it asserts that after keep_freed_cpu_memory() no process faults
# its steps' tensors in again once the heap has grown to hold them. That growth came at step 2 or 3 in every
# process measured (one more 8 MB block); the bound, a quarter of one step's pages over the ten, leaves room for
# it to come late on a loaded machine, against the 70K pages of a default process's ten steps.
_FAULTS_OF_STEPS = """
import resource, sys, torch
from seqmix.train import keep_freed_cpu_memory
if not keep_freed_cpu_memory():
    sys.exit(3)
def step():
    xs = [torch.ones(2 << 20) for _ in range(5)]
    del xs
for _ in range(4):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux")
def test_keep_freed_cpu_memory_stops_the_page_faults_of_each_step():
    pages_of_a_step = 5 * (8 << 20) // 4096
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", _FAULTS_OF_STEPS], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert int(done.stdout) < pages_of_a_step // 4
