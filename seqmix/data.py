"""Byte-level training data: text corpora as memory-mapped token arrays.

Tokens are the bytes 0-255 of the UTF-8 text plus a few special tokens, so no
tokenizer is ever downloaded. Each document (a file, or a dataset row) starts
with ``BOS``. The default corpus is the source and text files of the Python
standard library found on this machine (through ``sysconfig``): real text that
is present wherever Python is. It is split into train and validation by file,
deterministically (a hash of each file's path inside the corpus).

Token arrays are written once to a cache directory (``$SEQMIX_CACHE``, default
``~/.cache/seqmix``; see :func:`cache_root`), file by file, and read back with ``numpy.memmap``, so a corpus
need not fit in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259  # the tokens the data can contain; models may have a larger (padded) vocabulary
VAL_PERCENT = 2  # share of files (by path hash) that go to validation
FORMAT = 1  # bump when the cached arrays' layout changes
_TEXT_SUFFIXES = {".py", ".pyi", ".txt", ".rst", ".md", ".html", ".css", ".c", ".h", ".cfg", ".ini", ".toml",
                  ".json", ".xml", ".csv", ".decTest"}


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: Iterable[int]) -> str:
    """Bytes back to text; special tokens are dropped and invalid UTF-8 is replaced."""
    return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Corpus:
    """The memory-mapped token arrays (uint16) of one corpus."""

    name: str
    train: np.ndarray
    val: np.ndarray
    directory: Path  # where the arrays are cached

    def batch(self, split: str, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows of ``seq_len + 1`` tokens at ``starts`` [B]: inputs and next-token targets, [B, seq_len] int64."""
        data = self.train if split == "train" else self.val
        idx = starts.numpy()[:, None] + np.arange(seq_len + 1)
        window = torch.from_numpy(data[idx].astype(np.int64))
        return window[:, :-1], window[:, 1:]

    def random_starts(self, generator: torch.Generator, batch: int, seq_len: int) -> torch.Tensor:
        return torch.randint(0, len(self.train) - seq_len, (batch,), generator=generator)

    def val_starts(self, seq_len: int, max_tokens: int) -> torch.Tensor:
        """Consecutive, non-overlapping windows from the start of the validation split."""
        count = min((len(self.val) - 1) // seq_len, max(1, max_tokens // seq_len))
        return torch.arange(count) * seq_len


def cache_root() -> Path:
    """The token cache: ``$SEQMIX_CACHE`` when set, else ``~/.cache/seqmix``."""
    return Path(os.environ.get("SEQMIX_CACHE") or Path.home() / ".cache" / "seqmix")


def load_corpus(source: str | None, seq_len: int, cache_dir: str | Path | None = None) -> Corpus:
    """The corpus named by ``source``: None (the standard library), a text file, a directory of
    text files, or a Hugging Face dataset name (with ``datasets`` installed and the data cached).

    Raises ValueError naming ``source`` when it holds no text or too little for ``seq_len``.
    ``cache_dir``: where the token arrays go (default :func:`cache_root`).
    """
    cache_dir = Path(cache_dir) if cache_dir else cache_root()
    if source is None:
        name, (train_docs, val_docs, key) = "python-stdlib", _files_split(Path(sysconfig.get_paths()["stdlib"]),
                                                                           stdlib=True)
    elif Path(source).is_file():
        name, (train_docs, val_docs, key) = source, _single_file_split(Path(source))
    elif Path(source).is_dir():
        name, (train_docs, val_docs, key) = source, _files_split(Path(source), stdlib=False)
    else:
        name, (train_docs, val_docs, key) = source, _dataset_split(source)
    directory = cache_dir / hashlib.sha1(f"{FORMAT}:{key}".encode()).hexdigest()[:16]
    if not (directory / "meta.json").exists():
        _write_arrays(directory, name, train_docs, val_docs)
    meta = json.loads((directory / "meta.json").read_text())
    arrays = {s: np.memmap(directory / f"{s}.bin", dtype=np.uint16, mode="r", shape=(meta[s],)) for s in ("train", "val")}
    for split, tokens in arrays.items():
        if len(tokens) < seq_len + 2:
            raise ValueError(f"data {name!r}: the {split} split has {len(tokens)} tokens, fewer than "
                             f"seq_len + 2 = {seq_len + 2}; give more text or a shorter seq_len")
    return Corpus(name, arrays["train"], arrays["val"], directory)


def _read_text(path: Path) -> bytes | None:
    """The file's bytes if it is UTF-8 text (no NUL bytes), else None."""
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return None if b"\0" in data or not data.strip() else data


def _files_split(root: Path, stdlib: bool):
    """(train documents, val documents, cache key) of the text files under ``root``, split by path hash."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not (stdlib and d in ("site-packages", "dist-packages"))
                             and d != "__pycache__" and not d.startswith("."))
        for f in sorted(filenames):
            path = Path(dirpath) / f
            if not stdlib or path.suffix in _TEXT_SUFFIXES:
                files.append(path)
    stats = [(p, p.stat()) for p in files if p.is_file()]
    files = [p for p, _ in stats]
    key = json.dumps([(str(p.relative_to(root)), st.st_size, st.st_mtime_ns) for p, st in stats])
    texts = [(p, t) for p in files if (t := _read_text(p)) is not None]
    if not texts:
        raise ValueError(f"data {str(root)!r}: no UTF-8 text files in this directory")
    if len(texts) == 1:
        return _split_text(texts[0][1]) + (f"{root}:{key}",)
    hashes = [zlib.crc32(str(p.relative_to(root)).encode()) for p, _ in texts]
    # VAL_PERCENT of the files by hash; a small directory gives at least its lowest-hash file
    cut = max(VAL_PERCENT, min(h % 100 for h in hashes) + 1)
    val = [t for (_, t), h in zip(texts, hashes) if h % 100 < cut]
    train = [t for (_, t), h in zip(texts, hashes) if h % 100 >= cut]
    if not train:
        val, train = val[:1], val[1:]
    return train, val, f"{root}:{key}"


def _single_file_split(path: Path):
    text = _read_text(path)
    if text is None:
        raise ValueError(f"data {str(path)!r}: not a non-empty UTF-8 text file")
    stat = path.stat()
    return _split_text(text) + (f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}",)


def _split_text(text: bytes):
    """One document split by position: its last VAL_PERCENT (at least a little) is validation."""
    cut = len(text) - max(len(text) * VAL_PERCENT // 100, min(len(text) // 2, 4096))
    return [text[:cut]], [text[cut:]]


def _dataset_split(name: str):
    """Rows of a cached Hugging Face dataset's ``text`` column (validation split, or every 50th row)."""
    # the local cache only: a run never starts a download
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data {name!r}: not a file or directory, and the `datasets` package, which would "
                         f"look it up as a dataset name, is not installed") from None
    try:
        splits = datasets.load_dataset(name, download_mode="reuse_cache_if_exists")
    except Exception as e:  # datasets raises many kinds; the message is what the user needs
        raise ValueError(f"data {name!r}: not a file or directory, and not a dataset in the local "
                         f"Hugging Face cache ({type(e).__name__}: {e})") from None
    if "text" not in splits["train"].column_names:
        raise ValueError(f"data {name!r}: the dataset has no 'text' column ({splits['train'].column_names})")
    rows = (r.encode("utf-8") for r in splits["train"]["text"])
    if "validation" in splits:
        val_rows = [r.encode("utf-8") for r in splits["validation"]["text"]]
        return rows, val_rows, f"hf:{name}:{splits['train']._fingerprint}"
    train_rows = list(rows)
    return ([r for i, r in enumerate(train_rows) if i % 50], train_rows[::50],
            f"hf:{name}:{splits['train']._fingerprint}")


def _write_arrays(directory: Path, name: str, train_docs: Iterable[bytes], val_docs: Iterable[bytes]) -> None:
    """Stream documents into ``train.bin`` / ``val.bin`` (uint16, BOS before each), then ``meta.json``.

    Written in a temporary directory renamed into place, so a crash never leaves half an array behind.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    meta = {"name": name, "format": FORMAT}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        with open(tmp / f"{split}.bin", "wb") as f:
            meta[split] = sum(_write_doc(f, doc) for doc in docs)
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        tmp.rename(directory)
    except OSError:  # another process (a DDP rank, a parallel test) wrote it first: theirs is the same
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def _write_doc(f, doc: bytes) -> int:
    tokens = np.empty(len(doc) + 1, dtype=np.uint16)
    tokens[0] = BOS
    tokens[1:] = np.frombuffer(doc, dtype=np.uint8)
    f.write(tokens.tobytes())
    return len(tokens)

