"""A nested state (what a trainer rank checkpoints: step, RNG, sparsity masks, the driver's
position) in one safetensors file, so that loading it never runs code.

torch.save pickles; unpickling a crafted file runs whatever it names. Here the tensors go into a
safetensors file and the structure around them into that file's JSON metadata (key "tree"):

- None, bool, int, float (NaN/inf included), str: as JSON values;
- a list: a JSON list; a dict with str keys (none starting with "$"): a JSON object;
- {"$tuple": [...]}; {"$dict": [[key, value], ...]} for other keys; {"$tensor": "t7"} for
  torch tensors and {"$ndarray": "t8"} for numpy arrays (stored as tensor "t7"/"t8").

numpy scalars are stored as the Python number they hold. Anything else (a class instance, a
function) is refused at save time, naming where in the state it sits.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_TAG = "sparsetrain-state/1"
MAX_DEPTH = 64  # our own states nest a handful of levels; a deeper file is not ours


class StateFileError(ValueError):
    """A state file that cannot be read back (corrupt, not ours, or structurally wrong)."""


def save_state(path: str | Path, state: Any) -> None:
    """Write `state` to `path` (safetensors + JSON structure). Raises TypeError naming the
    first value that has no code-free representation."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "state", 0)
    save_file(tensors, str(path), metadata={"format": FORMAT_TAG, "tree": json.dumps(tree, allow_nan=True)})


def load_state(path: str | Path) -> Any:
    """Read a file written by save_state. Raises StateFileError (never runs code)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT_TAG:
                raise StateFileError(f"{path}: not a state file (format {meta.get('format')!r}, expected {FORMAT_TAG!r})")
            keys = set(f.keys())
            tree = json.loads(meta.get("tree", "null"))
            used: set[str] = set()
            state = _decode(tree, f, keys, used, 0)
    except StateFileError:
        raise
    except RecursionError:
        raise StateFileError(f"{path}: structure nests too deeply") from None
    except Exception as e:  # safetensors' own errors, bad JSON, OS errors
        raise StateFileError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    if used != keys:
        raise StateFileError(f"{path}: tensors {sorted(keys - used)[:5]} are not referenced by its structure")
    return state


def _encode(x: Any, tensors: dict, where: str, depth: int):
    if depth > MAX_DEPTH:
        raise TypeError(f"{where}: nests deeper than {MAX_DEPTH} levels")
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    if isinstance(x, np.generic):
        return _encode(x.item(), tensors, where, depth)
    if isinstance(x, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = x.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": key}
    if isinstance(x, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(x).copy())
        return {"$ndarray": key}
    if isinstance(x, list):
        return [_encode(v, tensors, f"{where}[{i}]", depth + 1) for i, v in enumerate(x)]
    if isinstance(x, tuple):
        return {"$tuple": [_encode(v, tensors, f"{where}[{i}]", depth + 1) for i, v in enumerate(x)]}
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in x):
            return {k: _encode(v, tensors, f"{where}[{k!r}]", depth + 1) for k, v in x.items()}
        return {"$dict": [[_encode(k, tensors, f"{where} key {k!r}", depth + 1),
                           _encode(v, tensors, f"{where}[{k!r}]", depth + 1)] for k, v in x.items()]}
    raise TypeError(f"{where}: a {type(x).__module__}.{type(x).__qualname__} cannot be checkpointed without "
                    "pickle; store plain numbers, strings, lists, dicts, tuples, tensors or numpy arrays")


def _decode(x: Any, f, keys: set, used: set, depth: int):
    if depth > MAX_DEPTH:
        raise StateFileError(f"structure nests deeper than {MAX_DEPTH} levels")
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, list):
        return [_decode(v, f, keys, used, depth + 1) for v in x]
    if not isinstance(x, dict):
        raise StateFileError(f"unexpected JSON value {type(x).__name__}")
    if len(x) == 1:
        (tag, value), = x.items()
        if tag in ("$tensor", "$ndarray"):
            if not isinstance(value, str) or value not in keys or value in used:
                raise StateFileError(f"{tag} {value!r} names no (unused) tensor of the file")
            used.add(value)
            t = f.get_tensor(value)
            return t if tag == "$tensor" else t.numpy()
        if tag == "$tuple":
            if not isinstance(value, list):
                raise StateFileError("$tuple holds no list")
            return tuple(_decode(v, f, keys, used, depth + 1) for v in value)
        if tag == "$dict":
            if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 for p in value):
                raise StateFileError("$dict holds no list of [key, value] pairs")
            out = {}
            for k, v in value:
                k = _decode(k, f, keys, used, depth + 1)
                try:
                    out[k] = _decode(v, f, keys, used, depth + 1)
                except TypeError:  # an unhashable key
                    raise StateFileError(f"$dict key of type {type(k).__name__}") from None
            return out
    if any(isinstance(k, str) and k.startswith("$") for k in x):
        raise StateFileError(f"unknown tag among {sorted(x)[:3]}")
    return {k: _decode(v, f, keys, used, depth + 1) for k, v in x.items()}
