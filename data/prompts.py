"""Prompt datasets for RL: rows read from a JSONL file, a Parquet file, or a directory written by
Hugging Face `datasets`' `save_to_disk`, in a seeded, resumable, per-epoch shuffled order.

Each row has a prompt column (`task.prompt_key`, default `prompt`) holding either a string or a
list of chat messages `[{"role": ..., "content": ...}, ...]`; every other column (an `answer`, a
`difficulty`, test cases...) travels with the sample to the reward functions. Reading a file
never runs code: JSON, Parquet and Arrow IPC are plain data.

    rows = load_rows("train.parquet", what="task.path")
    samples = to_samples(rows, "prompt", what="task.path")
    order = PromptOrder(samples, seed=0)
    batch = order.next(16)          # 16 Samples; epochs reshuffle with numpy rng([seed, epoch])
    order.state_dict()              # {"epoch": e, "index": i}: all a checkpoint needs
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class PromptDataError(ValueError):
    """A prompt dataset that is missing, unreadable, empty or malformed (the message names it)."""


@dataclass
class Sample:
    """One prompt and the other columns of its row."""
    prompt: str | list[dict]
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> Any:
        return self.columns.get("answer")


def load_rows(path: str | Path, what: str = "task.path") -> list[dict]:
    """All rows of a .jsonl / .parquet file or a `save_to_disk` directory, as plain dicts."""
    p = Path(path)
    if not p.exists():
        raise PromptDataError(f"{what}={str(path)!r} does not exist")
    if p.is_dir():
        return _load_saved_dataset(p, what)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _load_jsonl(p, what)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except Exception as e:
            raise PromptDataError(f"{what}={str(path)!r}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    raise PromptDataError(f"{what}={str(path)!r}: expected a .jsonl or .parquet file or a directory written by "
                          "datasets' save_to_disk")


def _load_jsonl(p: Path, what: str) -> list[dict]:
    rows = []
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptDataError(f"{what}={str(p)!r}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptDataError(f"{what}={str(p)!r} line {lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise PromptDataError(f"{what}={str(p)!r} line {lineno}: expected a JSON object, got {line[:80]!r}")
        rows.append(row)
    return rows


def _load_saved_dataset(p: Path, what: str) -> list[dict]:
    """A `Dataset.save_to_disk` directory: state.json lists Arrow IPC stream files (read with
    pyarrow, so `datasets` itself is not needed)."""
    import pyarrow as pa

    if (p / "dataset_dict.json").is_file():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        raise PromptDataError(f"{what}={str(p)!r} is a DatasetDict; point at one split's directory "
                              f"({', '.join(str(p / s) for s in splits) or 'e.g. <dir>/train'})")
    state = p / "state.json"
    if not state.is_file():
        raise PromptDataError(f"{what}={str(p)!r}: a directory must be written by datasets' save_to_disk "
                              "(state.json is missing)")
    try:
        files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        rows: list[dict] = []
        for name in files:
            with pa.memory_map(str(p / name)) as source:
                rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    except Exception as e:
        raise PromptDataError(f"{what}={str(p)!r}: cannot read the saved dataset ({type(e).__name__}: {e})") from e
    return rows


def to_samples(rows: list[dict], prompt_key: str = "prompt", what: str = "task.path") -> list[Sample]:
    """Rows -> Samples; an empty dataset, a missing prompt column or a malformed prompt is named."""
    if not rows:
        raise PromptDataError(f"{what}: the dataset holds no rows")
    samples = []
    for i, row in enumerate(rows):
        if prompt_key not in row:
            raise PromptDataError(f"{what}: row {i} has no column {prompt_key!r} (task.prompt_key); its columns are "
                                  f"{sorted(row)}")
        prompt = row[prompt_key]
        if not isinstance(prompt, str) and not is_chat(prompt):
            raise PromptDataError(f"{what}: row {i} column {prompt_key!r} must be a string or a list of "
                                  f"{{role, content}} messages, got {str(prompt)[:80]!r}")
        samples.append(Sample(prompt, {k: v for k, v in row.items() if k != prompt_key}))
    return samples


def is_chat(prompt: Any) -> bool:
    """Whether `prompt` is a non-empty list of {role: str, content: str} messages."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0 and
            all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt))


class PromptOrder:
    """Every sample once per epoch, in an order drawn from numpy.random.default_rng([seed, epoch])
    (`shuffle=False`: file order); the position (epoch, index) is all a checkpoint needs."""

    def __init__(self, samples: list[Sample], seed: int = 0, shuffle: bool = True):
        self.samples, self.seed, self.shuffle = samples, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.samples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))

    def next(self, n: int) -> list[Sample]:
        out = []
        for _ in range(n):
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            out.append(self.samples[int(self._order[self.index])])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)
