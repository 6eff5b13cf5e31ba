"""seqmix.hf: a seqmix model directory loads with transformers' Auto classes (offline), its greedy generate
equals LanguageModel.generate (attention + a recurrent mixer, left-padded batches, recurrent depth) and beam
search with the states equals beam search without a cache, the
labels loss equals seqmix's training loss, save_pretrained round-trips, pipeline("text-generation") and the
byte tokenizer agree with seqmix.data, and export() loads through trust_remote_code."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install seqmix[hf]); seqmix.hf needs it")

import seqmix.hf  # the Auto classes' registration
from seqmix.archs.lm import LanguageModel
from seqmix.data import BOS, EOS, PAD, decode, encode
from seqmix.hf import SeqmixCache, SeqmixForCausalLM, SeqmixTokenizer
from tests.helpers import save_tiny_model

AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A seqmix model directory as the trainer writes it (attention + a recurrent mixer) and the model."""
    path = tmp_path_factory.mktemp("model")
    return path, save_tiny_model(path, ["deltanet", "attention"])


def _tokens(B, T, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def test_auto_classes_load_a_seqmix_model_directory(saved):
    path, model = saved
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(hf, SeqmixForCausalLM) and not hf.training
    assert isinstance(AutoTokenizer.from_pretrained(path), SeqmixTokenizer)
    x = _tokens(2, 9)
    with torch.no_grad():
        assert torch.equal(hf(x).logits, model(x)[0])


def test_greedy_generate_equals_seqmix_generate(saved):
    path, model = saved
    hf = AutoModelForCausalLM.from_pretrained(path)
    prompt = _tokens(2, 7)
    out = hf.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.tolist() == model.generate(prompt, 6, temperature=0).tolist()
    # the attention layer's cache was sized for the whole generation (in-place decoding, no regrowth)
    attention_state = out.get("cache", out.get("past_key_values")).states[1]  # (the name depends on the version)
    assert attention_state["k"].shape[2] == 13 and attention_state["capacity"].tolist() == [13, 13]


def test_left_padded_batch_generates_each_prompt_as_alone(saved):
    path, model = saved
    hf, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    texts = ["ab", "déf main("]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch["input_ids"][0, 0] == PAD and batch["attention_mask"][0, 0] == 0
    out = hf.generate(**batch, max_new_tokens=5, do_sample=False)
    for row, text in zip(out, texts):
        alone = model.generate(torch.tensor([[BOS] + encode(text)]), 5, temperature=0)
        assert row[-5:].tolist() == alone[0, -5:].tolist(), text


def test_recurrent_depth_generate_takes_num_steps(tmp_path):
    model = save_tiny_model(tmp_path, ["attention", "recurrent_depth"],
                  recurrent_depth={"core": ["attention"], "mean_steps": 2})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    prompt = _tokens(1, 6)
    for num_steps in (None, 3):
        out = hf.generate(prompt, max_new_tokens=4, do_sample=False, num_steps=num_steps)
        assert out.tolist() == model.generate(prompt, 4, temperature=0, num_steps=num_steps).tolist(), num_steps


def test_beam_search_with_the_states_equals_beam_search_without_a_cache(saved):
    """The cache's rows follow their beams (reorder_cache): the same beams as recomputing every prefix."""
    path, _ = saved
    hf = AutoModelForCausalLM.from_pretrained(path)
    prompt = _tokens(2, 5)
    cached = hf.generate(prompt, max_new_tokens=4, num_beams=3, do_sample=False)
    recomputed = hf.generate(prompt, max_new_tokens=4, num_beams=3, do_sample=False, use_cache=False)
    assert cached.tolist() == recomputed.tolist()


def test_labels_loss_equals_seqmix_training_loss(saved):
    path, model = saved
    hf = AutoModelForCausalLM.from_pretrained(path)
    x = _tokens(2, 11)
    logits, _ = model(x)
    # seqmix.train: cross-entropy of the logits at t against the token at t + 1, averaged over all targets.
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(hf(x, labels=x).loss, expected, rtol=1e-6, atol=0)
    labels = x.clone()
    labels[:, :4] = -100  # the prompt part left out of the loss, as transformers does
    expected = F.cross_entropy(logits[:, 3:-1].flatten(0, 1), x[:, 4:].flatten())
    torch.testing.assert_close(hf(x, labels=labels).loss, expected, rtol=1e-6, atol=0)


def test_save_pretrained_round_trip(saved, tmp_path):
    path, model = saved
    hf = AutoModelForCausalLM.from_pretrained(path)
    hf.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path)
    x = _tokens(1, 8)
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert torch.equal(again(x).logits, model(x)[0])
        # seqmix reads transformers' directory too (the generate CLI does)
        assert torch.equal(LanguageModel.from_pretrained(tmp_path).eval()(x)[0], model(x)[0])
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path), SeqmixTokenizer)


def test_pipeline_text_generation_equals_seqmix(saved):
    path, model = saved
    generator = transformers.pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(path),
                                      tokenizer=AutoTokenizer.from_pretrained(path))
    text = "déf main("
    result = generator(text, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    tokens = model.generate(torch.tensor([[BOS] + encode(text)]), 6, temperature=0)
    assert result == text + decode(tokens[0, -6:].tolist())


def test_cache_is_the_mixers_states(saved):
    """Prefill then one step with the returned cache gives the logits of the whole sequence at once."""
    path, _ = saved
    hf = AutoModelForCausalLM.from_pretrained(path)
    x = _tokens(2, 10)
    with torch.no_grad():
        first = hf(x[:, :9], use_cache=True)
        assert isinstance(first.cache, SeqmixCache) and first.cache.get_seq_length() == 9
        step = hf(x[:, 9:], cache=first.cache)
        full = hf(x).logits
    assert step.cache.get_seq_length() == 10 and hf(x).cache is None
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)


def test_tokenizer_matches_seqmix_data():
    tokenizer = SeqmixTokenizer()
    text = "naïve € 💡 code"
    ids = tokenizer(text).input_ids
    assert ids == [BOS] + encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text == decode(ids)
    assert tokenizer.decode(ids + [EOS]) == "<s>" + text + "</s>"
    # ids of the model's padded vocabulary past the tokenizer's are dropped, as seqmix.data.decode drops them
    assert tokenizer.decode(encode("ab") + [300] + encode("c")) == "abc" == decode(encode("ab") + [300] + encode("c"))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, PAD)


def test_unsupported_arguments_are_refused(saved):
    path, _ = saved
    hf = AutoModelForCausalLM.from_pretrained(path)
    x = _tokens(1, 4)
    with pytest.raises(ValueError, match="inputs_embeds is not supported"):
        hf(inputs_embeds=hf.get_input_embeddings()(x))
    with pytest.raises(ValueError, match="does not support.*output_hidden_states"):
        hf(x, output_hidden_states=True)


@pytest.mark.slow
def test_export_loads_with_trust_remote_code_in_a_fresh_process(saved, tmp_path):
    """An exported directory (from a run directory) loads without importing seqmix.hf first, the way
    lm-evaluation-harness's hf model does; transformers' module cache goes to tmp_path, not ~/.cache."""
    path, model = saved
    run = tmp_path / "run"
    run.mkdir()
    (run / "model").symlink_to(path)
    out = seqmix.hf.export(run, tmp_path / "export")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "ids = torch.tensor([tokenizer.encode('def f(')])\n"
        "print(model.generate(ids, max_new_tokens=5, do_sample=False)[0].tolist())\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    expected = model.generate(torch.tensor([[BOS] + encode("def f(")]), 5, temperature=0)
    assert result.stdout.strip() == str(expected[0].tolist())
