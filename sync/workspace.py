"""What the encoder and the decoder share to run chunk work on threads: the worker count, the
size from which a payload is worth parallelising, and per-thread scratch arrays."""
from __future__ import annotations

import os
import threading

import numpy as np

PARALLEL_MIN_ELEMS = 1 << 20
_SCRATCH = threading.local()


def workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def scratch(name: str, size: int, dtype) -> np.ndarray:
    """A per-thread work array, reused across chunks (fresh ones would page-fault every time)."""
    have = getattr(_SCRATCH, name, None)
    if have is None or have.shape[0] < size:
        have = np.empty(max(size, 1 << 16), dtype)
        setattr(_SCRATCH, name, have)
    return have[:size]
