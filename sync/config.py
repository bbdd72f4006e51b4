"""Configuration of the weight synchronizer (composed into Hydra configs by launch/)."""
from __future__ import annotations

from dataclasses import dataclass

LEVELS = ("fast", "best")


@dataclass
class SyncConfig:
    level: str = "fast"  # "fast" (Ray path, speed bar) | "best" (CLI default, smallest)
    bucket_bytes: int = 32 << 20  # target payload size of one bucket
    history: int = 8  # deltas the publisher keeps so a lagging receiver gets a chain
    published_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"sync.level must be one of {LEVELS}, got {self.level!r}")
        if self.bucket_bytes < 4096:
            raise ValueError(f"sync.bucket_bytes must be >= 4096, got {self.bucket_bytes}")
        if self.history < 0:
            raise ValueError(f"sync.history must be >= 0, got {self.history}")
