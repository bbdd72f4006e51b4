"""Where prompts come from: built-in verifiable tasks generated on the fly, or a prompt dataset.

A task hands out `Sample`s (data/prompts.py: a prompt plus the other columns of its row); the
reward functions (rollout/rewards.py) score completions against those columns. Built-in tasks
are short enough for a byte-level model, with the correct result in an `answer` column:

    addition  "37+45="      -> "82"       (operands with `task.digits` digits)
    sort      "sort:dbca="  -> "abcd"     (`task.length` random lowercase letters)
    reverse   "rev:abcd="   -> "dcba"
    dataset   rows of `task.path` (.jsonl, .parquet, or a datasets save_to_disk directory); the
              prompt in column `task.prompt_key` (a string or chat messages), every epoch in a
              new order drawn from `task.seed`

The driver owns the task (its position is part of the driver's checkpoint) and sends the
sampled prompts to the rollout workers.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

from data.prompts import PromptDataError, PromptOrder, Sample, load_rows, to_samples

BUILTIN_TASKS = ("addition", "sort", "reverse")
TASKS = (*BUILTIN_TASKS, "dataset")


@dataclass
class TaskConfig:
    name: str = "addition"  # addition | sort | reverse | dataset
    digits: int = 2  # addition: digits per operand
    length: int = 4  # sort / reverse: letters per prompt
    path: str | None = None  # dataset: training prompts (.jsonl | .parquet | save_to_disk directory)
    eval_path: str | None = None  # held-out prompts for rl.eval_every (same formats)
    prompt_key: str = "prompt"  # dataset: the column holding the prompt (string or chat messages)
    shuffle: bool = True  # dataset: a new order every epoch (false: file order)
    seed: int = 0  # dataset: seed of the epoch orders
    eval_prompts: int = 32  # built-in tasks without eval_path: a fixed set of this many prompts
    # built-in name, package.module:function or path/to/file.py:function; called once per batch
    reward_fns: list[str] = field(default_factory=lambda: ["exact_match"])
    reward_weights: list[float] = field(default_factory=list)  # one per reward function (empty: all 1)
    reward_timeout_s: float = 60.0  # per call of a reward function (0: none)
    on_reward_error: str = "zero"  # zero: count + log + reward 0 | raise: stop with the function and row named


class TaskConfigError(ValueError):
    pass


class Task(Protocol):
    def sample(self, n: int, rng: random.Random) -> list[Sample]: ...

    def eval_samples(self) -> list[Sample]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class GeneratedTask:
    """A built-in task: prompts drawn from the driver's RNG (checkpointed with the driver)."""

    def __init__(self, eval_prompts: int, eval_path: str | None, prompt_key: str):
        self.eval_prompts, self.eval_path, self.prompt_key = eval_prompts, eval_path, prompt_key

    def make(self, rng: random.Random) -> Sample:
        raise NotImplementedError

    def sample(self, n: int, rng: random.Random) -> list[Sample]:
        return [self.make(rng) for _ in range(n)]

    def eval_samples(self) -> list[Sample]:
        if self.eval_path:
            return to_samples(load_rows(self.eval_path, "task.eval_path"), self.prompt_key, "task.eval_path")
        return self.sample(self.eval_prompts, random.Random(1_000_003))  # fixed, apart from training's stream

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class AdditionTask(GeneratedTask):
    def __init__(self, digits: int, **kw):
        super().__init__(**kw)
        if digits < 1:
            raise TaskConfigError(f"task.digits={digits} must be >= 1")
        self.lo, self.hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1

    def make(self, rng: random.Random) -> Sample:
        a, b = rng.randint(self.lo, self.hi), rng.randint(self.lo, self.hi)
        return Sample(f"{a}+{b}=", {"answer": str(a + b)})


class LettersTask(GeneratedTask):
    """sort or reverse a random lowercase string."""

    def __init__(self, kind: str, length: int, **kw):
        super().__init__(**kw)
        if length < 1:
            raise TaskConfigError(f"task.length={length} must be >= 1")
        self.kind, self.length = kind, length
        self.prefix = {"sort": "sort:", "reverse": "rev:"}[kind]

    def make(self, rng: random.Random) -> Sample:
        s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(self.length))
        ans = "".join(sorted(s)) if self.kind == "sort" else s[::-1]
        return Sample(f"{self.prefix}{s}=", {"answer": ans})


class DatasetTask:
    """Prompts of `task.path`, each epoch in a seeded order; `task.eval_path` for evaluation."""

    def __init__(self, cfg: TaskConfig):
        if not cfg.path:
            raise TaskConfigError("task=dataset needs task.path=<.jsonl | .parquet | save_to_disk directory>")
        self.cfg = cfg
        self.samples = to_samples(load_rows(cfg.path, "task.path"), cfg.prompt_key, f"task.path={cfg.path!r}")
        self.order = PromptOrder(self.samples, cfg.seed, cfg.shuffle)
        self._eval: list[Sample] | None = None
        if cfg.eval_path:
            self._eval = to_samples(load_rows(cfg.eval_path, "task.eval_path"), cfg.prompt_key,
                                    f"task.eval_path={cfg.eval_path!r}")

    def sample(self, n: int, rng: random.Random) -> list[Sample]:
        return self.order.next(n)

    def eval_samples(self) -> list[Sample]:
        if self._eval is None:
            raise TaskConfigError("rl.eval_every > 0 with task=dataset needs task.eval_path (held-out prompts)")
        return self._eval

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.order.load_state_dict(state)


def build_task(cfg: TaskConfig) -> Task:
    """The task; every config or data problem raises here (TaskConfigError / PromptDataError),
    before actors start."""
    if cfg.on_reward_error not in ("zero", "raise"):
        raise TaskConfigError(f"task.on_reward_error={cfg.on_reward_error!r}; expected 'zero' or 'raise'")
    if cfg.reward_timeout_s < 0:
        raise TaskConfigError(f"task.reward_timeout_s={cfg.reward_timeout_s}: expected >= 0 (0: no timeout)")
    common = {"eval_prompts": cfg.eval_prompts, "eval_path": cfg.eval_path, "prompt_key": cfg.prompt_key}
    if cfg.name == "addition":
        return AdditionTask(cfg.digits, **common)
    if cfg.name in ("sort", "reverse"):
        return LettersTask(cfg.name, cfg.length, **common)
    if cfg.name == "dataset":
        return DatasetTask(cfg)
    raise TaskConfigError(f"task.name={cfg.name!r} is unknown; expected one of {list(TASKS)}")


__all__ = ["TaskConfig", "TaskConfigError", "Task", "Sample", "PromptDataError", "build_task", "BUILTIN_TASKS"]
