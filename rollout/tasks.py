"""Verifiable tasks: prompts with exact answers, generated on the fly or read from a JSONL file.

A task hands out `Prompt`s (text + answer); the reward function (rollout/rewards.py) scores a
completion against the answer. Built-in tasks are short enough for a byte-level model:

    addition  "37+45="      -> "82"       (operands with `task.digits` digits)
    sort      "sort:dbca="  -> "abcd"     (`task.length` random lowercase letters)
    reverse   "rev:abcd="   -> "dcba"
    jsonl     one {"prompt": str, "answer": str | null} object per line of `task.prompts_file`
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rollout.rewards import RewardFn, load_reward_fn


@dataclass
class TaskConfig:
    name: str = "addition"  # addition | sort | reverse | jsonl
    digits: int = 2  # addition: digits per operand
    length: int = 4  # sort / reverse: letters per prompt
    prompts_file: str | None = None  # jsonl: path to the prompts file
    reward_fn: str = "exact_match"  # built-in name or "package.module:function"
    on_reward_error: str = "zero"  # zero: count + log + reward 0 | raise: stop with the sample named


class TaskConfigError(ValueError):
    pass


@dataclass
class Prompt:
    text: str
    answer: str | None = None


class Task(Protocol):
    def sample(self, n: int, rng: random.Random) -> list[Prompt]: ...


class AdditionTask:
    def __init__(self, digits: int):
        if digits < 1:
            raise TaskConfigError(f"task.digits={digits} must be >= 1")
        self.lo, self.hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1

    def sample(self, n: int, rng: random.Random) -> list[Prompt]:
        out = []
        for _ in range(n):
            a, b = rng.randint(self.lo, self.hi), rng.randint(self.lo, self.hi)
            out.append(Prompt(f"{a}+{b}=", str(a + b)))
        return out


class LettersTask:
    """sort or reverse a random lowercase string."""

    def __init__(self, kind: str, length: int):
        if length < 1:
            raise TaskConfigError(f"task.length={length} must be >= 1")
        self.kind, self.length = kind, length
        self.prefix = {"sort": "sort:", "reverse": "rev:"}[kind]

    def sample(self, n: int, rng: random.Random) -> list[Prompt]:
        out = []
        for _ in range(n):
            s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(self.length))
            ans = "".join(sorted(s)) if self.kind == "sort" else s[::-1]
            out.append(Prompt(f"{self.prefix}{s}=", ans))
        return out


class JsonlTask:
    """Prompts read once from a local JSONL file; sampled uniformly with replacement."""

    def __init__(self, path: str | None):
        if not path:
            raise TaskConfigError("task.name=jsonl needs task.prompts_file=<path to a .jsonl file>")
        p = Path(path)
        if not p.is_file():
            raise TaskConfigError(f"task.prompts_file={path!r} does not exist")
        self.prompts: list[Prompt] = []
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"task.prompts_file={path!r} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskConfigError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise TaskConfigError(f"{where}: expected an object with a string 'prompt', got {line[:80]!r}")
            answer = obj.get("answer")
            if answer is not None and not isinstance(answer, str):
                raise TaskConfigError(f"{where}: 'answer' must be a string or null, got {answer!r}")
            self.prompts.append(Prompt(obj["prompt"], answer))
        if not self.prompts:
            raise TaskConfigError(f"task.prompts_file={path!r} holds no prompts")

    def sample(self, n: int, rng: random.Random) -> list[Prompt]:
        return [self.prompts[rng.randrange(len(self.prompts))] for _ in range(n)]


TASKS = ("addition", "sort", "reverse", "jsonl")


def build_task(cfg: TaskConfig) -> tuple[Task, RewardFn]:
    """The task and its reward function; every config problem raises here, before actors start."""
    if cfg.on_reward_error not in ("zero", "raise"):
        raise TaskConfigError(f"task.on_reward_error={cfg.on_reward_error!r}; expected 'zero' or 'raise'")
    if cfg.name == "addition":
        task: Task = AdditionTask(cfg.digits)
    elif cfg.name in ("sort", "reverse"):
        task = LettersTask(cfg.name, cfg.length)
    elif cfg.name == "jsonl":
        task = JsonlTask(cfg.prompts_file)
    else:
        raise TaskConfigError(f"task.name={cfg.name!r} is unknown; expected one of {list(TASKS)}")
    return task, load_reward_fn(cfg.reward_fn)
