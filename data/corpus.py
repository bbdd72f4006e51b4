"""Turn a DataConfig into token arrays: a training stream and a held-out eval stream.

Text sources (`stdlib`, `text`) are read as documents in sorted path order, tokenized one
document at a time through the model's tokenizer (models/tokenizer.py interface) and joined with
the tokenizer's EOS id. A document goes to eval when the CRC32 of its path key falls below
`eval_fraction` (stable across runs and machines with the same files); if that leaves either side
empty (e.g. a single file), the joined stream is split at its tail instead.

A `tokens` source is a raw binary file of token ids (no header), memory-mapped with
`token_dtype`; its last `eval_fraction` of tokens is the eval stream.
"""
from __future__ import annotations

import glob
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.config import DataConfig
from models.tokenizer import Tokenizer

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "int32": np.int32}


class DataError(ValueError):
    """Bad data input: a missing path, a glob that matches nothing, an empty corpus, a bad token file."""


@dataclass
class TokenCorpus:
    train: np.ndarray  # 1-D token ids
    eval: np.ndarray  # 1-D token ids
    description: str  # what was read, for logs


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer) -> TokenCorpus:
    if not 0.0 < cfg.eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction={cfg.eval_fraction} must be in (0, 1)")
    if cfg.source == "tokens":
        return _load_token_file(cfg, tokenizer)
    if cfg.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = stdlib_files(root, cfg.stdlib_exclude)
        keys = [str(f.relative_to(root)) for f in files]
        what = f"stdlib {root}"
    elif cfg.source == "text":
        files = resolve_text_files(cfg.paths)
        keys = [str(f) for f in files]
        what = f"text {list(cfg.paths)}"
    else:
        raise DataError(f"data.source={cfg.source!r} is unknown; expected 'stdlib', 'text' or 'tokens'")
    return _tokenize_documents(files, keys, what, cfg, tokenizer)


def stdlib_files(root: Path, exclude: list[str]) -> list[Path]:
    """The standard library's .py files under `root`, skipping any path with a part in `exclude`."""
    excluded = set(exclude)
    files = sorted(
        p for p in root.rglob("*.py")
        if not excluded.intersection(p.relative_to(root).parts[:-1]) and p.is_file()
    )
    if not files:
        raise DataError(f"data.source=stdlib found no .py files under {root}")
    return files


def resolve_text_files(patterns: list[str]) -> list[Path]:
    """Expand files and glob patterns (recursive `**`); every entry must match at least one file."""
    if not patterns:
        raise DataError("data.source=text needs data.paths: a list of files or glob patterns")
    files: set[Path] = set()
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matched = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
            if not matched:
                raise DataError(f"data.paths entry {pattern!r} is a glob that matches no file")
            files.update(p.resolve() for p in matched)
        else:
            path = Path(pattern)
            if not path.exists():
                raise DataError(f"data.paths entry {pattern!r} does not exist")
            if path.is_dir():
                raise DataError(f"data.paths entry {pattern!r} is a directory; give files or a glob like '{pattern}/**/*.txt'")
            files.add(path.resolve())
    return sorted(files)


def _tokenize_documents(files, keys, what, cfg: DataConfig, tokenizer: Tokenizer) -> TokenCorpus:
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    train_docs: list[np.ndarray] = []
    eval_docs: list[np.ndarray] = []
    all_docs: list[np.ndarray] = []
    threshold = int(cfg.eval_fraction * 2**32)
    read = 0
    for path, key in zip(files, keys):
        if cfg.max_bytes is not None and read >= cfg.max_bytes:
            break
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise DataError(f"cannot read data file {path}: {e}") from e
        read += len(text)
        if not text.strip():
            continue
        doc = np.concatenate([np.asarray(tokenizer.encode(text), dtype=dtype), eos])
        all_docs.append(doc)
        (eval_docs if zlib.crc32(key.encode()) < threshold else train_docs).append(doc)
    if not all_docs:
        raise DataError(f"data corpus is empty: {what} ({len(files)} files) holds no text")
    if train_docs and eval_docs:
        return TokenCorpus(np.concatenate(train_docs), np.concatenate(eval_docs), f"{what}: {len(all_docs)} documents")
    stream = np.concatenate(all_docs)
    return _split_tail(stream, cfg.eval_fraction, f"{what}: {len(all_docs)} documents (tail split)")


def _load_token_file(cfg: DataConfig, tokenizer: Tokenizer) -> TokenCorpus:
    if not cfg.token_file:
        raise DataError("data.source=tokens needs data.token_file: a raw binary file of token ids")
    if cfg.token_dtype not in TOKEN_DTYPES:
        raise DataError(f"data.token_dtype={cfg.token_dtype!r} is unknown; expected one of {sorted(TOKEN_DTYPES)}")
    path = Path(os.path.expanduser(cfg.token_file))
    if not path.is_file():
        raise DataError(f"data.token_file {str(path)!r} does not exist")
    dtype = np.dtype(TOKEN_DTYPES[cfg.token_dtype])
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"data.token_file {str(path)!r} is empty")
    if size % dtype.itemsize:
        raise DataError(f"data.token_file {str(path)!r} has {size} bytes, not a multiple of {cfg.token_dtype} ({dtype.itemsize} bytes)")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    # Checking the max touches the whole file once; cheap next to training, and it catches a
    # file tokenized with another vocabulary before a step runs.
    top = int(tokens.max())
    if top >= tokenizer.vocab_size:
        raise DataError(f"data.token_file {str(path)!r} holds token id {top}, outside the tokenizer's vocabulary of {tokenizer.vocab_size}")
    return _split_tail(tokens, cfg.eval_fraction, f"tokens {path} ({len(tokens)} tokens)")


def _split_tail(stream: np.ndarray, eval_fraction: float, what: str) -> TokenCorpus:
    cut = len(stream) - max(1, int(len(stream) * eval_fraction))
    return TokenCorpus(stream[:cut], stream[cut:], what)
