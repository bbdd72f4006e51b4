"""Process-wide defaults that keep a local run self-contained: no network, no hangs.

Every entry point (and the test suite) calls `set_runtime_defaults()` before importing Ray,
DeepSpeed or wandb (launch/env.py re-exports it); the trainer rank calls it too. It lives down here
so that trainer/ never imports launch/. Users override any of these by exporting the variable
themselves.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def set_runtime_defaults() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")  # online only when the user asks (logger.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # stay on 127.0.0.1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # DeepSpeed JIT-compiles its CPU ops on first use (15-30 s each): keep them in the repo.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(PROJECT_ROOT / ".torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local paths only
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
