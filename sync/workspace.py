"""What the encoder and the decoder share to run chunk work on threads: the worker count, the
size from which a payload is worth parallelising, and per-thread scratch arrays."""
from __future__ import annotations

import os
import threading

import numpy as np

PARALLEL_MIN_ELEMS = 1 << 20
_SCRATCH = threading.local()


def workers() -> int:
    """Threads for one payload's chunks: the process's torch thread budget (a trainer rank's or
    rollout worker's `num_threads`), at most 2. A process given one core gains nothing from a
    second thread but pool and GIL overhead (a 101M-element delta staged in 0.26 s on two
    threads, 0.17 s on one, here), and more threads only split the same memory bandwidth."""
    import torch

    return max(1, min(2, torch.get_num_threads(), os.cpu_count() or 1))


def scratch(name: str, size: int, dtype) -> np.ndarray:
    """A per-thread work array, reused across chunks (fresh ones would page-fault every time);
    one per name and dtype."""
    dtype = np.dtype(dtype)
    key = f"{name}_{dtype.str}"
    have = getattr(_SCRATCH, key, None)
    if have is None or have.shape[0] < size:
        have = np.empty(max(size, 1 << 16), dtype)
        setattr(_SCRATCH, key, have)
    return have[:size]
