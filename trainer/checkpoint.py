"""Checkpoints on disk: atomic, verified before use, never overwritten, and loading one never
runs code.

Layout under a run's checkpoint root:

    checkpoints/
      step_00000100/            one complete checkpoint
        manifest.json           step, world size, ZeRO stage, parameter shapes, sparsity method,
                                every file with its size and xxh3-128 digest (written last, so a
                                complete manifest means a complete checkpoint)
        ds/...                  DeepSpeed engine state (model, optimizer; ZeRO shards per rank):
                                DeepSpeed's pickles, read only with torch.load(weights_only=True)
                                and an explicit allowlist of the DeepSpeed classes they hold
        rank_00000.safetensors  per rank: step, RNG (torch/numpy/python), sparsity state, extra
                                (the driver's data position), written by trainer/state_file.py
      .staging-step_00000200-<id>/   a checkpoint being written; ignored, never loaded

Every rank writes into the staging directory; the driver then writes the manifest and renames
the directory to `step_XXXXXXXX`. A failing save removes its staging directory: an existing
checkpoint is never touched, and committing onto an existing name is an error.

Before anything is loaded, every file's size and digest are checked against the manifest
(`validate_checkpoint` in the driver, `verify_files` again on each rank for the files it reads).
The digests catch corruption (a flipped bit, a truncated copy), not a writer who also rewrites
the manifest; that writer still cannot make loading run code.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import xxhash

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 1: pickled rank files and sizes only (refused: loading them could run code)
DIGEST = "xxh3_128"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_RANK_FILE = re.compile(r"^rank_(\d{5})\.safetensors$")
_DS_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-data-parallel-rank shards
_READ_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, incomplete, or does not fit this run."""


@dataclass
class CheckpointExtra:
    """The job's own sections of a checkpoint, beside the ranks' model, optimizer, sparsity and
    RNG state (every rank's state file holds them as `extra`)."""

    driver: dict[str, Any] = field(default_factory=dict)  # the job loop's state (launch/rl_job.py DriverState, pretraining's)
    data: dict[str, Any] = field(default_factory=dict)  # where the data stream is (pretraining's sampler)
    algo_state: dict[str, Any] = field(default_factory=dict)  # the RL algorithm's own (PPO's value head)

    def to_state(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: Any, where: str) -> CheckpointExtra:
        names = {f.name for f in fields(cls)}
        if not isinstance(state, dict) or not set(state) <= names:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"{where}: its extra section holds {found}, expected some of {sorted(names)}")
        return cls(**state)


class ResumeError(CheckpointError):
    """`resume` cannot be honoured as asked (checkpoints exist but resume is null, or resuming an
    older checkpoint would collide with newer ones)."""


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
    """Write the manifest (every file with its size and digest) into `staging`, then rename it to
    `root/step_XXXXXXXX`. Raises CheckpointError rather than replace an existing checkpoint."""
    target = Path(root) / step_dir_name(step)
    if target.exists():
        raise CheckpointError(f"checkpoint {target} already exists; refusing to overwrite it")
    files = {str(p.relative_to(staging)): {"bytes": p.stat().st_size, DIGEST: file_digest(p)}
             for p in sorted(staging.rglob("*")) if p.is_file()}
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


def save_checkpoint(group, root: str | Path, step: int, fingerprint: dict, extra: CheckpointExtra, *, keep: int) -> Path:
    """The one save path of both jobs: every rank of `group` (anything with
    `save_checkpoint(path, extra)`, e.g. launch/trainer_group.py's TrainerGroup) writes into a
    fresh staging directory, the manifest and an atomic rename commit it, then leftovers of
    killed earlier attempts and checkpoints beyond the newest `keep` are removed. A failure
    removes this save's staging directory and leaves every committed checkpoint as it was."""
    root = Path(root)
    staging = new_staging_dir(root, step)
    try:
        group.save_checkpoint(str(staging), extra)
        path = commit(staging, root, step, fingerprint)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    remove_staging(root)
    prune(root, keep)
    return path


def find_resume_checkpoint(resume: str | None, root: str | Path, key: str = "resume",
                           error: type[Exception] = ResumeError) -> Path | None:
    """The checkpoint to continue from (`resume`: None = start fresh, "auto" = the latest under
    `root`, or a checkpoint directory), or None to start fresh. Raised as `error` (naming the
    config `key`): checkpoints under `root` with resume=None (they would be overwritten), and an
    explicit checkpoint older than one under `root` (the resumed run would write the steps after
    it again, colliding with the newer ones) - refused here, before anything trains."""
    root = Path(root)
    found = list_checkpoints(root)
    latest = found[-1][1] if found else None
    if resume is None:
        if latest is not None:
            raise error(f"{root} already holds checkpoints (latest {latest.name}); pass {key}=auto to continue it, "
                        "or choose a fresh hydra.run.dir (existing checkpoints are never overwritten)")
        return None
    if resume == "auto":
        return latest
    path = Path(resume)
    m = _STEP_DIR.match(path.name)
    step = int(m.group(1)) if m else read_manifest(path).get("step")
    newer = [p.name for s, p in found if isinstance(step, int) and s > step and p.resolve() != path.resolve()]
    if newer:
        raise error(f"{key}={resume}: {root} already holds newer checkpoints {newer[:3]}; resuming from an older one "
                    f"would write those steps again. Pass {key}=auto, move the newer checkpoints away, or resume "
                    "into a fresh hydra.run.dir")
    return path


# ---------------------------------------------------------------- verification


def file_digest(path: str | Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict:
    """The manifest of checkpoint `path`, with its file list checked for shape (not content)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"checkpoint {path}/{MANIFEST} is corrupt: {e}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version == 1:
        raise CheckpointError(f"checkpoint {path} has format_version 1 (pickled rank files, no digests), written "
                              f"before format {FORMAT_VERSION}; it cannot be loaded without running code from it")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} has format_version {version!r}, expected {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} lists no files")
    for rel, rec in files.items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts or rel == MANIFEST:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} names the file {rel!r}, outside the checkpoint")
        if not (isinstance(rec, dict) and isinstance(rec.get("bytes"), int) and not isinstance(rec["bytes"], bool)
                and isinstance(rec.get(DIGEST), str)):
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} entry for {rel} has no byte count and {DIGEST} digest")
    return manifest


def files_for_rank(manifest: dict, rank: int) -> list[str]:
    """The manifest's files a data-parallel rank reads: all but other ranks' own files."""
    out = []
    for rel in manifest["files"]:
        name = Path(rel).name
        m = _RANK_FILE.match(name) or _DS_RANK_FILE.search(name)
        if m is None or int(m.group(1)) == rank:
            out.append(rel)
    return out


def verify_files(path: str | Path, manifest: dict, only: Iterable[str] | None = None) -> None:
    """Every listed file (or those in `only`) exists with its recorded size and digest, and the
    directory holds no file the manifest does not list. Sizes first (cheap), then digests."""
    path = Path(path)
    files = manifest["files"]
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() or p.is_symlink()} - {MANIFEST}
    unknown = sorted(present - set(files))
    if unknown:
        raise CheckpointError(f"checkpoint {path} holds {unknown[:3]}, which its {MANIFEST} does not list")
    names = list(files) if only is None else list(only)
    for rel in names:
        f = path / rel
        if f.is_symlink() or not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {rel}" if not f.is_symlink()
                                  else f"checkpoint {path}: {rel} is a symbolic link")
        size = f.stat().st_size
        if size != files[rel]["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {rel} has {size} bytes, the manifest says "
                                  f"{files[rel]['bytes']} (corrupt or truncated)")
    for rel in names:
        have = file_digest(path / rel)
        if have != files[rel][DIGEST]:
            raise CheckpointError(f"checkpoint {path}: {rel} is corrupt: its {DIGEST} digest is {have}, "
                                  f"the manifest says {files[rel][DIGEST]}")


def validate_checkpoint(path: str | Path, expected: dict) -> dict:
    """Check a checkpoint before any actor loads it: every key of `expected` (world size, ZeRO
    stage, parameter shapes, sparsity method...) matches, and its files are all there with their
    recorded sizes and digests. Returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for key, want in expected.items():
        have = manifest.get(key)
        if have != want:
            if isinstance(want, dict) and isinstance(have, dict):
                diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))[:5]
                raise CheckpointError(f"checkpoint {path} does not fit this run: {key} differs at {diff}")
            raise CheckpointError(f"checkpoint {path} does not fit this run: {key}={have!r}, this run has {want!r}")
    verify_files(path, manifest)
    return manifest


# ---------------------------------------------------------------- loading without code


def rank_file(path: str | Path, rank: int) -> Path:
    return Path(path) / f"rank_{rank:05d}.safetensors"


def save_rank_state(path: str | Path, rank: int, state: dict) -> None:
    from trainer.state_file import save_state

    save_state(rank_file(path, rank), state)


def load_rank_state(path: str | Path, rank: int) -> dict:
    from trainer.state_file import StateFileError, load_state

    f = rank_file(path, rank)
    try:
        state = load_state(f)
    except StateFileError as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {f.name}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {f.name} holds a {type(state).__name__}, expected a dict")
    return state


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed's checkpoint pickles hold besides tensors and containers (ZeRO
    stage 0-3, fp32 and bf16): allowed by name for torch.load(weights_only=True), nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextmanager
def weights_only_torch_load(allowed: list) -> Iterator[None]:
    """Within the block, every torch.load (DeepSpeed's included, whatever it asks for) runs with
    weights_only=True and `allowed` as its only extra globals: a pickle that names anything else
    fails with an UnpicklingError instead of running it."""
    original = torch.load

    def load(f, map_location=None, *args, **kwargs):
        if args or kwargs.pop("pickle_module", None) is not None:
            raise CheckpointError("torch.load with a custom pickle module is refused while loading a checkpoint")
        kwargs["weights_only"] = True
        return original(f, map_location=map_location, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = original


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
