"""Tokenizers behind one small interface: `encode(str) -> list[int]`, `decode(list[int]) -> str`,
plus `vocab_size`, `bos_id`, `eos_id`, `pad_id`.

The byte-level tokenizer is the default: every UTF-8 byte is a token (0-255), then three
specials. It needs no files, so the embedded defaults run anywhere.
"""
from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
