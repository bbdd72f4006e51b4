"""Sparse or dense, per publish: whichever has been fastest end to end on this link.

A sparse publish costs encode + a small transfer + decode; a dense one costs the transfer of the
full weights. Which wins depends on the change fraction, the CPUs and the link, so neither is
modelled: both are measured, from "publish begins" to "every receiver committed", and scaled by
the bytes they moved. The first publish goes dense (it is a full send anyway), which measures the
link; later ones go sparse unless the dense estimate beats what sparse publishes have been
taking (without measurements, e.g. a caller that never reports times, they stay sparse). `sync.mode=sparse|dense` forces one.
"""
from __future__ import annotations

from dataclasses import dataclass

EMA = 0.5  # weight of the newest measurement
# Dense must be predicted this much faster before it replaces sparse: near a tie, timing noise
# would otherwise flip the choice, and sparse also spares the link for everything else.
DENSE_MARGIN = 0.9


@dataclass
class ModeChooser:
    mode: str = "auto"  # "auto" | "sparse" | "dense"
    dense_s_per_byte: float | None = None  # measured on dense publishes
    sparse_s: float | None = None  # recent sparse publishes, end to end
    decisions: int = 0

    def choose(self, dense_bytes: int) -> bool:
        """True: publish dense (full weights, raw); False: sparse delta."""
        self.decisions += 1
        if self.mode != "auto":
            return self.mode == "dense"
        if self.decisions == 1:  # a full send anyway: raw measures the link best
            return True
        if self.dense_s_per_byte is None or self.sparse_s is None:
            return False
        return self.dense_s_per_byte * dense_bytes < DENSE_MARGIN * self.sparse_s

    def observe(self, dense: bool, seconds: float, dense_bytes: int) -> None:
        """A publish of `dense_bytes` full-weight bytes took `seconds` end to end."""
        if dense:
            per = seconds / max(1, dense_bytes)
            self.dense_s_per_byte = per if self.dense_s_per_byte is None else EMA * per + (1 - EMA) * self.dense_s_per_byte
        else:
            self.sparse_s = seconds if self.sparse_s is None else EMA * seconds + (1 - EMA) * self.sparse_s
