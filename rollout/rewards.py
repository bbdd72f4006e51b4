"""Reward functions as users write them: `fn(prompts, completions, **columns) -> list[float]`.

A reward function is called once per batch (as TRL calls them): `prompts[i]` is row i's prompt as
the dataset holds it (a string or chat messages), `completions[i]` the decoded completion, and
every other dataset column comes by name as a list aligned with them (`answer=[...]`,
`difficulty=[...]`). A function without `**kwargs` gets only the columns it names. It returns
one number per row (None, NaN or a non-number counts as a failure of that row).

    task.reward_fns=[exact_match, my_pkg.rewards:format_ok, examples/arith/reward.py:correct]
    task.reward_weights=[1.0, 0.1, 1.0]      (empty: every weight 1)

The row's reward is the weighted sum. Each function is loaded from a built-in name, an
importable `package.module:function`, or a Python file `path/to/file.py:function` (the file is
imported as a module: it is code the user asked to run). Each call has a timeout
(`task.reward_timeout_s`).

Failures: a call that raises or times out fails all its rows, a non-number fails its row. With
`task.on_reward_error=zero` (default) a failed row gets 0 from that function, is counted
(`reward/failures` metric, `reward.failures` in summary.json) and logged with its index and
prompt; with `task.on_reward_error=raise` a RewardFunctionError naming the function and row stops
the step. A result of the wrong length is always an error: the function does not do what the
job needs.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

RewardFn = Callable[..., list]


class RewardFunctionError(ValueError):
    """A reward function that cannot be loaded, returns the wrong thing, or failed on a named row."""


def exact_match(prompts: list, completions: list[str], answer: list | None = None, **_) -> list[float]:
    """1.0 where the completion (stripped of surrounding whitespace) equals the `answer` column."""
    if answer is None or any(a is None for a in answer):
        raise RewardFunctionError("exact_match needs an 'answer' column with a value on every row")
    return [1.0 if c.strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


BUILTIN_REWARDS: dict[str, RewardFn] = {"exact_match": exact_match}


def load_reward_fn(spec: str, what: str = "task.reward_fns") -> RewardFn:
    """A built-in name, `package.module:function` or `path/to/file.py:function` -> the callable."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise RewardFunctionError(f"{what}: {spec!r} is unknown: expected one of {sorted(BUILTIN_REWARDS)}, "
                                  "'package.module:function' or 'path/to/file.py:function'")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise RewardFunctionError(f"{what}: {spec!r}: the file {where!r} does not exist")
        name = f"_reward_file_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise RewardFunctionError(f"{what}: {spec!r}: {where!r} cannot be imported as a Python module")
            module = importlib.util.module_from_spec(module_spec)
            try:
                module_spec.loader.exec_module(module)
            except Exception as e:
                raise RewardFunctionError(f"{what}: {spec!r}: importing {where!r} failed: "
                                          f"{type(e).__name__}: {e}") from e
            sys.modules[name] = module
        source = f"the file {where!r}"
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise RewardFunctionError(f"{what}: {spec!r}: cannot import module {where!r} ({e})") from e
        source = f"module {where!r}"
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise RewardFunctionError(f"{what}: {spec!r}: {source} has no function {attr!r}")
    return fn


@dataclass
class RewardFunction:
    name: str  # the metric suffix: reward/<name>
    spec: str
    fn: RewardFn
    weight: float = 1.0


def build_reward_fns(specs: list[str], weights: list[float]) -> list[RewardFunction]:
    """Load every function of `task.reward_fns`; weights must match them (empty: all 1)."""
    if not specs:
        raise RewardFunctionError("task.reward_fns is empty: name at least one reward function")
    if weights and len(weights) != len(specs):
        raise RewardFunctionError(f"task.reward_weights has {len(weights)} entries but task.reward_fns names "
                                  f"{len(specs)} functions ({list(specs)}); give one weight per function or none")
    for w in weights:
        if not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise RewardFunctionError(f"task.reward_weights={list(weights)}: every weight must be a finite number")
    out, seen = [], set()
    for i, spec in enumerate(specs):
        name = spec.rpartition(":")[2] or spec
        if name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        out.append(RewardFunction(name, spec, load_reward_fn(spec), float(weights[i]) if weights else 1.0))
    return out


@dataclass
class ScoredBatch:
    rewards: list[float]  # the weighted sum per row
    components: dict[str, list[float]] = field(default_factory=dict)  # each function's rewards by name
    failures: list[tuple[int, str]] = field(default_factory=list)  # (row index, reason)


def call_with_timeout(fn: Callable, timeout_s: float | None, *args, **kwargs) -> Any:
    """fn(*args, **kwargs) on a helper thread; TimeoutError after `timeout_s` (the thread is
    abandoned: Python cannot stop it)."""
    if not timeout_s:
        return fn(*args, **kwargs)
    box: dict[str, Any] = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, name="reward-fn", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"no result after {timeout_s:g} s (task.reward_timeout_s)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def accepted_columns(fn: Callable, columns: dict[str, list]) -> dict[str, list]:
    """The columns `fn` takes: all with **kwargs, else the ones it names."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return columns
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return columns
    names = {p.name for p in params}
    return {k: v for k, v in columns.items() if k in names}


def check_result(rf: RewardFunction, value: Any, n: int) -> list:
    """The returned sequence as a list of length n, or RewardFunctionError naming the function."""
    if hasattr(value, "tolist"):  # numpy array, torch tensor
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise RewardFunctionError(f"reward function {rf.spec!r} returned {type(value).__name__}; expected a list of "
                                  f"{n} numbers (one per completion; it is called once per batch)")
    if len(value) != n:
        raise RewardFunctionError(f"reward function {rf.spec!r} returned {len(value)} values for a batch of {n} "
                                  "completions; expected one number per completion")
    return list(value)


def is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def score_batch(fns: list[RewardFunction], prompts: list, completions: list[str], columns: dict[str, list],
                on_error: str = "zero", timeout_s: float | None = None) -> ScoredBatch:
    """Call every function once on the batch; the weighted rewards, per-function rewards, failures."""
    n = len(completions)
    total = [0.0] * n
    scored = ScoredBatch(total)
    for rf in fns:
        values = [0.0] * n
        try:
            raw = check_result(rf, call_with_timeout(rf.fn, timeout_s, prompts, completions,
                                                     **accepted_columns(rf.fn, columns)), n)
        except RewardFunctionError:
            raise
        except Exception as e:  # a user function may raise anything: all its rows fail
            reason = f"reward function {rf.spec!r} failed on the batch of {n}: {type(e).__name__}: {e}"
            if on_error == "raise":
                raise RewardFunctionError(reason) from e
            log.warning("%s; its rewards set to 0", reason)
            scored.failures.extend((i, reason) for i in range(n))
            raw = [0.0] * n
        for i, v in enumerate(raw):
            if is_number(v) and math.isfinite(v):
                values[i] = float(v)
                continue
            reason = (f"reward function {rf.spec!r} on row {i} (prompt {prompts[i]!r}, completion "
                      f"{completions[i]!r}): returned {v!r}, expected a finite number")
            if on_error == "raise":
                raise RewardFunctionError(reason)
            log.warning("%s; reward set to 0", reason)
            scored.failures.append((i, reason))
        scored.components[rf.name] = values
        for i in range(n):
            total[i] += rf.weight * values[i]
    return scored


def probe_reward_fns(fns: list[RewardFunction], prompts: list, columns: dict[str, list],
                     timeout_s: float | None = None) -> None:
    """Before any actor starts: call each function on a couple of real rows with empty completions
    and refuse one that returns the wrong length or non-numbers (None, strings). A function that
    raises on this probe is not judged here: at run time its failures are counted."""
    n = len(prompts)
    for rf in fns:
        try:
            value = call_with_timeout(rf.fn, timeout_s, prompts, [""] * n, **accepted_columns(rf.fn, columns))
        except Exception:
            continue
        for i, v in enumerate(check_result(rf, value, n)):
            if not is_number(v):
                raise RewardFunctionError(f"reward function {rf.spec!r} returned {v!r} for row {i} of a probe batch; "
                                          "expected a number per completion")
