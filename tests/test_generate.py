"""python -m seqmix.generate: the streamed text is the decoded output of LanguageModel.generate (greedy,
seeded sampling, recurrent depth), characters of several bytes print whole, bad arguments exit 2."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqmix.data import BOS, decode, encode
from seqmix.generate import TextStream, main
from tests.helpers import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "déf f("


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run's layout: the model in model/ (an attention and a recurrent layer)."""
    run = tmp_path_factory.mktemp("run")
    return run, save_tiny_model(run / "model", ["deltanet", "attention"])


def _expected(model, n, **kwargs):
    prompt = torch.tensor([[BOS] + encode(PROMPT)])
    tokens = model.generate(prompt, n, **kwargs)
    return PROMPT + decode(tokens[0, prompt.shape[1]:].tolist()) + "\n"


def test_greedy_text_equals_generate(run_dir, capsys):
    run, model = run_dir
    main([str(run), "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0"])
    assert capsys.readouterr().out == _expected(model, 8, temperature=0)


def test_seeded_sampling_equals_generate_and_takes_a_model_directory(run_dir, capsys):
    run, model = run_dir
    # on the CPU wherever the test runs: a seed draws other numbers from a CUDA generator than from the CPU's
    main([str(run / "model"), "--prompt", PROMPT, "--max-new-tokens", "8", "--top-k", "5", "--seed", "3",
          "--temperature", "0.9", "--device", "cpu"])
    expected = _expected(model, 8, temperature=0.9, top_k=5, generator=torch.Generator().manual_seed(3))
    assert capsys.readouterr().out == expected


def test_num_steps_reach_the_recurrent_depth_layer(tmp_path, capsys):
    model = save_tiny_model(tmp_path, ["attention", "recurrent_depth"],
                  recurrent_depth={"core": ["attention"], "mean_steps": 2})
    main([str(tmp_path), "--prompt", PROMPT, "--max-new-tokens", "6", "--temperature", "0", "--num-steps", "3"])
    out = capsys.readouterr().out
    assert out == _expected(model, 6, temperature=0, num_steps=3)


def test_stream_writes_each_character_once_its_bytes_are_in():
    out = io.StringIO()
    stream, writes = TextStream(out), []
    out.write = writes.append
    for byte in "aé€".encode():
        stream(torch.tensor([[byte]]))
    stream(torch.tensor([[BOS]]))  # special tokens print nothing, as decode() drops them
    stream.close()
    assert writes == ["a", "", "é", "", "", "€", "", ""]


@pytest.mark.slow
def test_streams_through_python_dash_m(run_dir):
    """The module runs as a program and prints the same text, one write per token (flushed)."""
    run, model = run_dir
    result = subprocess.run(
        [sys.executable, "-m", "seqmix.generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "8",
         "--temperature", "0"], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == _expected(model, 8, temperature=0)


@pytest.mark.parametrize("args, message", [
    (["--num-steps", "2"], "--num-steps is given, but the model has no recurrent-depth layer"),
    (["--exit-threshold", "0.01"], "--exit-threshold is given, but the model has no recurrent-depth layer"),
    (["--top-k", "0"], "argument --top-k: must be >= 1"),
    (["--top-k", "1000"], "--top-k 1000 is larger than the model's vocabulary (320)"),
    (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0"),
    (["--temperature", "abc"], "argument --temperature: 'abc' is not a number"),
    (["--max-new-tokens", "-3"], "argument --max-new-tokens: must be >= 0"),
    (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "--device cuda"),
    (["--no-bos"], "--no-bos needs a --prompt"),
])
def test_bad_arguments_exit_2_naming_them(run_dir, capsys, args, message):
    run, _ = run_dir
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "seqmix.generate: error: " in err and message in err, err


def test_a_directory_without_a_model_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "is neither a model directory" in capsys.readouterr().err
