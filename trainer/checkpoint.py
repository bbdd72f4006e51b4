"""Checkpoints on disk: atomic, validated before use, never overwritten.

Layout under a run's checkpoint root:

    checkpoints/
      step_00000100/            one complete checkpoint
        manifest.json           step, world size, ZeRO stage, parameter shapes, sparsity method,
                                every file with its size (written last, so a complete manifest
                                means a complete checkpoint)
        ds/...                  DeepSpeed engine state (model, optimizer; ZeRO shards per rank)
        rank_00000.pt           per rank: step, RNG (torch/numpy/python), sparsity state, extra
                                (the driver's data position)
      .staging-step_00000200-<id>/   a checkpoint being written; ignored, never loaded

Every rank writes into the staging directory; the driver then writes the manifest and renames
the directory to `step_XXXXXXXX`. A failing run leaves at most a staging directory behind: an
existing checkpoint is never touched, and committing onto an existing name is an error.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, incomplete, or does not fit this run."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Committed checkpoints under `root` (staging directories excluded), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def new_staging_dir(root: str | Path, step: int) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".staging-{step_dir_name(step)}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def commit(staging: Path, root: str | Path, step: int, manifest: dict) -> Path:
    """Write the manifest (file list and sizes included) into `staging`, then rename it to
    `root/step_XXXXXXXX`. Raises CheckpointError rather than replace an existing checkpoint."""
    target = Path(root) / step_dir_name(step)
    if target.exists():
        raise CheckpointError(f"checkpoint {target} already exists; refusing to overwrite it")
    files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
    body = {"format_version": FORMAT_VERSION, "step": step, **manifest, "files": files}
    tmp = staging / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    os.replace(tmp, staging / MANIFEST)
    _fsync_dir(staging)
    os.rename(staging, target)  # atomic on one filesystem; fails if target appeared meanwhile
    _fsync_dir(Path(root))
    return target


def remove_staging(root: str | Path) -> list[Path]:
    """Delete staging directories (left by runs that died mid-write). Only the run that owns
    `root` may call this, when it is not writing one itself."""
    stale = [p for p in Path(root).glob(".staging-*") if p.is_dir()] if Path(root).is_dir() else []
    for p in stale:
        shutil.rmtree(p)
    return stale


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` committed checkpoints (keep=0: delete none)."""
    if keep <= 0:
        return []
    old = [p for _, p in list_checkpoints(root)[:-keep]]
    for p in old:
        shutil.rmtree(p)
    return old


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}/{MANIFEST} is corrupt: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} has format_version "
                              f"{manifest.get('format_version') if isinstance(manifest, dict) else None}, expected {FORMAT_VERSION}")
    return manifest


def validate_checkpoint(path: str | Path, expected: dict) -> dict:
    """Check a checkpoint before any actor loads it: its files are all there with their
    recorded sizes, and every key of `expected` (world size, ZeRO stage, parameter shapes,
    sparsity method...) matches. Returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for rel, size in manifest.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {rel}")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path}: {rel} has {f.stat().st_size} bytes, the manifest says {size} (corrupt or truncated)")
    for key, want in expected.items():
        have = manifest.get(key)
        if have != want:
            if isinstance(want, dict) and isinstance(have, dict):
                diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))[:5]
                raise CheckpointError(f"checkpoint {path} does not fit this run: {key} differs at {diff}")
            raise CheckpointError(f"checkpoint {path} does not fit this run: {key}={have!r}, this run has {want!r}")
    return manifest


def rank_file(path: str | Path, rank: int) -> Path:
    return Path(path) / f"rank_{rank:05d}.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
