"""data/corpus.py: sources, train/eval split, clear errors."""
from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest

from data import DataConfig, DataError, load_corpus
from models import ByteTokenizer

TOK = ByteTokenizer()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_text_files_tokenized_and_split_by_document(tmp_path):
    docs = {f"d{i:02d}.txt": f"document number {i}\n" * 3 for i in range(40)}
    for name, text in docs.items():
        write(tmp_path / name, text)
    cfg = DataConfig(source="text", paths=[str(tmp_path / "*.txt")], eval_fraction=0.25)
    corpus = load_corpus(cfg, TOK)
    # Independent reference: CRC32 of each resolved path against the threshold, EOS after each doc.
    threshold = int(0.25 * 2**32)
    train, evald = [], []
    for name in sorted(docs):
        key = str((tmp_path / name).resolve())
        ids = list(docs[name].encode()) + [TOK.eos_id]
        (evald if zlib.crc32(key.encode()) < threshold else train).extend(ids)
    assert train and evald
    assert corpus.train.tolist() == train
    assert corpus.eval.tolist() == evald


def test_single_file_falls_back_to_a_tail_split(tmp_path):
    write(tmp_path / "one.txt", "x" * 999)
    corpus = load_corpus(DataConfig(source="text", paths=[str(tmp_path / "one.txt")], eval_fraction=0.1), TOK)
    assert len(corpus.train) + len(corpus.eval) == 1000  # 999 bytes + EOS
    assert len(corpus.eval) == 100
    assert corpus.eval[-1] == TOK.eos_id


def test_stdlib_default_reads_this_pythons_sources_without_tests():
    corpus = load_corpus(DataConfig(max_bytes=300_000), TOK)
    assert str(Path(sysconfig.get_paths()["stdlib"])) in corpus.description
    assert len(corpus.train) > 200_000 and len(corpus.eval) > 0
    assert corpus.train.dtype == np.uint16


def test_token_file_is_memory_mapped_with_its_dtype(tmp_path):
    ids = (np.arange(10_000) % 259).astype(np.uint16)
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    corpus = load_corpus(DataConfig(source="tokens", token_file=str(path), token_dtype="uint16", eval_fraction=0.1), TOK)
    assert isinstance(corpus.train, np.memmap)
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.eval]), ids)
    assert len(corpus.eval) == 1000


@pytest.mark.parametrize("cfg_kwargs, message", [
    ({"source": "text", "paths": ["/no/such/file.txt"]}, "does not exist"),
    ({"source": "text", "paths": ["/no/such/dir/*.txt"]}, "matches no file"),
    ({"source": "text", "paths": []}, "needs data.paths"),
    ({"source": "tokens", "token_file": "/no/such/tokens.bin"}, "does not exist"),
    ({"source": "parquet"}, "data.source='parquet' is unknown"),
    ({"eval_fraction": 1.5}, "eval_fraction"),
])
def test_bad_sources_name_the_thing(cfg_kwargs, message):
    with pytest.raises(DataError, match=message):
        load_corpus(DataConfig(**cfg_kwargs), TOK)


def test_empty_corpus_is_an_error(tmp_path):
    write(tmp_path / "a.txt", "")
    write(tmp_path / "b.txt", "   \n\n")
    with pytest.raises(DataError, match="corpus is empty"):
        load_corpus(DataConfig(source="text", paths=[str(tmp_path / "*.txt")]), TOK)


def test_directory_instead_of_files_is_an_error(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_corpus(DataConfig(source="text", paths=[str(tmp_path)]), TOK)


def test_token_file_errors(tmp_path):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="not a multiple of uint16"):
        load_corpus(DataConfig(source="tokens", token_file=str(odd)), TOK)
    big = tmp_path / "big.bin"
    np.array([1, 2, 5000], dtype=np.uint16).tofile(big)
    with pytest.raises(DataError, match="token id 5000"):
        load_corpus(DataConfig(source="tokens", token_file=str(big)), TOK)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        load_corpus(DataConfig(source="tokens", token_file=str(empty)), TOK)
