"""Byte-level data: the standard-library corpus, files and directories, memmapped arrays, errors."""

import sys
import sysconfig
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from seqmix.data import BOS, VOCAB_SIZE, cache_root, decode, encode, load_corpus

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture
def text_dir(tmp_path):
    """A directory of real text: a few dozen standard-library modules, and one binary file."""
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    for i, path in enumerate(sorted(STDLIB.glob("*.py"))[:60]):
        (root / ("sub" if i % 2 else "") / path.name).write_bytes(path.read_bytes())
    (root / "blob.bin").write_bytes(bytes(range(256)) * 4)
    return root


def test_encode_decode_round_trip():
    text = "déjà vu: ∑ x_i → ∞\n"
    tokens = encode(text)
    assert max(tokens) < 256 and decode(tokens) == text
    assert decode([BOS, *tokens]) == text


def test_default_corpus_is_the_stdlib_split_by_file(tmp_path):
    corpus = load_corpus(None, 128, cache_dir=tmp_path)
    assert corpus.name == "python-stdlib"
    assert corpus.train.dtype == np.uint16 and isinstance(corpus.train, np.memmap)
    assert len(corpus.train) > 1_000_000 and 10_000 < len(corpus.val) < len(corpus.train) // 10
    assert int(corpus.train.max()) < VOCAB_SIZE and corpus.train[0] == BOS
    assert "def " in decode(corpus.val[:20000].tolist())
    again = load_corpus(None, 128, cache_dir=tmp_path)  # read back from the cache, same arrays
    assert np.array_equal(again.val, corpus.val)


def test_directory_corpus_skips_binary_files_and_splits_by_file(text_dir, tmp_path):
    corpus = load_corpus(str(text_dir), 64, cache_dir=tmp_path / "cache")
    texts = [p.read_bytes() for p in text_dir.rglob("*.py")]
    total = sum(len(t) + 1 for t in texts if t.strip())
    assert len(corpus.train) + len(corpus.val) == total  # every non-blank text file, plus one BOS each; no blob
    assert (np.asarray(corpus.val) == BOS).sum() >= 1 and (np.asarray(corpus.train) == BOS).sum() > 30


def test_the_cache_is_under_seqmix_cache(text_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("SEQMIX_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "seqmix"
    monkeypatch.setenv("SEQMIX_CACHE", str(tmp_path / "tokens"))
    corpus = load_corpus(str(text_dir), 64)
    assert corpus.directory.parent == tmp_path / "tokens" and (corpus.directory / "train.bin").is_file()


def test_single_file_is_split_by_position(tmp_path):
    path = tmp_path / "one.txt"
    path.write_bytes((STDLIB / "argparse.py").read_bytes())
    corpus = load_corpus(str(path), 64, cache_dir=tmp_path / "cache")
    text = path.read_bytes()
    assert bytes(np.concatenate([corpus.train[1:], corpus.val[1:]]).astype(np.uint8)) == text


def test_batches_are_next_token_windows(text_dir, tmp_path):
    corpus = load_corpus(str(text_dir), 32, cache_dir=tmp_path / "cache")
    starts = corpus.random_starts(torch.Generator().manual_seed(0), 4, 32)
    x, y = corpus.batch("train", starts, 32)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert x[:, 1:].equal(y[:, :-1])
    assert x[0].tolist() == corpus.train[int(starts[0]) : int(starts[0]) + 32].tolist()
    val = corpus.val_starts(32, max_tokens=10**9)
    assert val[1] - val[0] == 32 and int(val[-1]) + 33 <= len(corpus.val)


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="not a file or directory"):
        load_corpus(str(tmp_path / "missing"), 32, cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no UTF-8 text files"):
        load_corpus(str(tmp_path / "empty"), 32, cache_dir=tmp_path)
    (tmp_path / "small.txt").write_text("only a few words")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        load_corpus(str(tmp_path / "small.txt"), 32, cache_dir=tmp_path)


class _Split:
    """The part of a `datasets.Dataset` that load_corpus reads."""

    def __init__(self, columns, fingerprint):
        self._columns, self._fingerprint = columns, fingerprint

    @property
    def column_names(self):
        return list(self._columns)

    def __getitem__(self, column):
        return self._columns[column]


def _fake_datasets(monkeypatch, splits):
    """Stands in for the optional `datasets` package (checked by hand against datasets 5.2.0's offline cache)."""
    def load_dataset(name, download_mode):
        if name not in splits:
            raise FileNotFoundError(f"Couldn't find cache for {name}")
        return splits[name]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hugging_face_dataset_by_name(monkeypatch, tmp_path):
    rows = [f"row {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(200)]
    _fake_datasets(monkeypatch, {
        "org/with-val": {"train": _Split({"text": rows}, "a"), "validation": _Split({"text": rows[:5]}, "b")},
        "org/train-only": {"train": _Split({"text": rows}, "c")},
        "org/no-text": {"train": _Split({"content": rows}, "d")},
    })

    def tokens(docs):  # a BOS before each row
        return sum(len(d.encode()) + 1 for d in docs)

    corpus = load_corpus("org/with-val", 16, cache_dir=tmp_path)
    assert (len(corpus.train), len(corpus.val)) == (tokens(rows), tokens(rows[:5]))
    assert decode(corpus.val.tolist()) == "".join(rows[:5])

    corpus = load_corpus("org/train-only", 16, cache_dir=tmp_path)  # every 50th row is validation
    assert (len(corpus.train), len(corpus.val)) == (tokens(rows) - tokens(rows[::50]), tokens(rows[::50]))
    assert decode(corpus.val.tolist()) == "".join(rows[::50])

    with pytest.raises(ValueError, match="no 'text' column"):
        load_corpus("org/no-text", 16, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="not a dataset in the local Hugging Face cache"):
        load_corpus("org/missing", 16, cache_dir=tmp_path)


def test_dataset_name_without_the_datasets_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ValueError, match="`datasets` package.*is not installed"):
        load_corpus("org/name", 16, cache_dir=tmp_path)
