"""Data config: where the pretraining tokens come from and how they are split and ordered."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    # stdlib: this interpreter's own standard library .py files (no download);
    # text: `paths`, files or glob patterns (recursive `**` allowed), read as UTF-8 text;
    # tokens: `token_file`, a flat array of token ids (raw binary, no header) memory-mapped
    #         with `token_dtype` (uint16 for vocabularies < 65536, else uint32).
    source: str = "stdlib"
    paths: list[str] = field(default_factory=list)
    token_file: str | None = None
    token_dtype: str = "uint16"
    # stdlib only: skip tests and installed packages, which are not the standard library proper.
    stdlib_exclude: list[str] = field(default_factory=lambda: ["site-packages", "test", "tests", "idlelib"])
    max_bytes: int | None = None  # text/stdlib: stop reading files after this many bytes (None: all)
    eval_fraction: float = 0.02  # share of documents (text) or of the token tail (tokens) held out
    seed: int | None = None  # order of training windows; None: trainer.seed
