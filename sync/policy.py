"""Sparse or dense, per publish: whichever has been fastest end to end on this link.

A sparse publish costs encode + a small transfer + decode; a dense one costs the transfer of the
full weights. Which wins depends on the change fraction, the CPUs and the link, so neither is
modelled: both are measured, from "publish begins" to "every receiver committed", and scaled by
the bytes they moved. The first publish goes dense (it is a full send anyway), which measures the
link; later ones go sparse unless the dense estimate beats what sparse publishes have been
taking (without measurements, e.g. a caller that never reports times, they stay sparse), with
an occasional dense re-probe while it is cheap (REPROBE_EVERY). `sync.mode=sparse|dense` forces
one.
"""
from __future__ import annotations

from dataclasses import dataclass

EMA = 0.5  # weight of the newest measurement
# Dense must be predicted this much faster before it replaces sparse: near a tie, timing noise
# would otherwise flip the choice, and sparse also spares the link for everything else.
DENSE_MARGIN = 0.9
# While sparse wins, the dense measurement ages (the link may have become faster, the deltas
# denser): every REPROBE_EVERY sparse publishes one goes dense again, but only when the last
# dense measurement predicts it costs at most REPROBE_MAX_COST sparse publishes, so a probe
# never costs a slow link a full send it clearly loses.
REPROBE_EVERY = 50
REPROBE_MAX_COST = 2.0


@dataclass
class ModeChooser:
    mode: str = "auto"  # "auto" | "sparse" | "dense"
    dense_s_per_byte: float | None = None  # measured on dense publishes
    sparse_s: float | None = None  # recent sparse publishes, end to end
    decisions: int = 0
    sparse_since_dense: int = 0

    def choose(self, dense_bytes: int) -> bool:
        """True: publish dense (full weights, raw); False: sparse delta."""
        self.decisions += 1
        if self.mode != "auto":
            return self.mode == "dense"
        if self.decisions == 1:  # a full send anyway: raw measures the link best
            return True
        if self.dense_s_per_byte is None or self.sparse_s is None:
            return False
        dense_s = self.dense_s_per_byte * dense_bytes
        if dense_s < DENSE_MARGIN * self.sparse_s:
            return True
        return self.sparse_since_dense >= REPROBE_EVERY and dense_s <= REPROBE_MAX_COST * self.sparse_s

    def observe(self, dense: bool, seconds: float, dense_bytes: int) -> None:
        """A publish of `dense_bytes` full-weight bytes took `seconds` end to end."""
        self.sparse_since_dense = 0 if dense else self.sparse_since_dense + 1
        if dense:
            per = seconds / max(1, dense_bytes)
            self.dense_s_per_byte = per if self.dense_s_per_byte is None else EMA * per + (1 - EMA) * self.dense_s_per_byte
        else:
            self.sparse_s = seconds if self.sparse_s is None else EMA * seconds + (1 - EMA) * self.sparse_s
