"""Configuration of the weight synchronizer (composed into Hydra configs by launch/)."""
from __future__ import annotations

from dataclasses import dataclass

LEVELS = ("fast", "best")  # what a user picks for deltas
CODEC_LEVELS = LEVELS + ("raw",)  # "raw": a full send, every tensor whole and uncompressed
MODES = ("auto", "sparse", "dense")


@dataclass
class SyncConfig:
    level: str = "fast"  # "fast" (Ray path, speed bar) | "best" (CLI default, smallest)
    bucket_bytes: int = 32 << 20  # target payload size of one bucket
    history: int = 8  # deltas the publisher keeps so a lagging receiver gets a chain
    published_dtype: str = "bfloat16"
    # Each trainer rank encodes its slice in parts of about this many dense bytes; a receiver
    # fetches and decodes part i while part i+1 is still being encoded (pipelining), and its
    # transient memory is one part's payload.
    part_bytes: int = 16 << 20
    # What a publish sends: "sparse" (a delta at `level`), "dense" (the full weights, raw), or
    # "auto": whichever was fastest end to end, from measured publish times (sync/policy.py).
    mode: str = "auto"
    # Seconds a receiver waits for one part of an update, and how many such waits it makes
    # before giving up with a typed error: a link that stalls for a while (while Ray still
    # counts its node alive) only delays the update; a dead trainer rank or lost object fails at
    # once (Ray says so), and a stall that outlasts every attempt ends in an error, never a hang.
    fetch_timeout_s: float = 60.0
    fetch_attempts: int = 10
    # Seconds the driver waits for one rollout worker to apply an update (every fetch attempt
    # included); a worker that has not answered by then is asked to fetch the update once more
    # by itself, and is replaced when it cannot.
    apply_timeout_s: float = 900.0
    # Every this many publishes (and at the end of a job) each receiver re-reads its committed
    # weights and digests them against the publisher's checksum (0: only at the end).
    verify_every: int = 10
    # Rollout nodes relay each update onward (sync/relay.py), so the trainer nodes send it once
    # whatever the number of nodes: 1 = a chain (each link carries each byte once: the fastest
    # where links are the bottleneck), k = a tree in which each node serves k others (shallower,
    # for many nodes and small updates), 0 = every node fetches from the trainer nodes.
    relay_fanout: int = 1

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"sync.level must be one of {LEVELS}, got {self.level!r}")
        if self.mode not in MODES:
            raise ValueError(f"sync.mode must be one of {MODES}, got {self.mode!r}")
        if self.bucket_bytes < 4096:
            raise ValueError(f"sync.bucket_bytes must be >= 4096, got {self.bucket_bytes}")
        if self.part_bytes < 4096:
            raise ValueError(f"sync.part_bytes must be >= 4096, got {self.part_bytes}")
        if self.history < 0:
            raise ValueError(f"sync.history must be >= 0, got {self.history}")
        if not self.fetch_timeout_s > 0:
            raise ValueError(f"sync.fetch_timeout_s must be > 0, got {self.fetch_timeout_s}")
        if not (isinstance(self.fetch_attempts, int) and self.fetch_attempts >= 1):
            raise ValueError(f"sync.fetch_attempts must be an integer >= 1, got {self.fetch_attempts!r}")
        if not (isinstance(self.relay_fanout, int) and self.relay_fanout >= 0):
            raise ValueError(f"sync.relay_fanout must be an integer >= 0 (0: no relay), got {self.relay_fanout!r}")
        if not self.apply_timeout_s > 0:
            raise ValueError(f"sync.apply_timeout_s must be > 0, got {self.apply_timeout_s}")
