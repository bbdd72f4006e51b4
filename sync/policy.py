"""Sparse or dense, per publish: whichever has been fastest end to end on this link.

A sparse publish costs encode + a small transfer + decode; a dense one costs the transfer of the
full weights. Which wins depends on the change fraction, the CPUs and the link, so neither is
modelled: both are measured, from "publish begins" to "every receiver committed" (dense scaled
by the bytes it moved). The first publish goes dense (it is a full send anyway), which measures
the link; the next one sparse; later ones whichever is predicted faster (without measurements,
e.g. a caller that never reports times, they stay sparse). `sync.mode=sparse|dense` forces one.

Neither choice can lock in. The mode not in use is measured again on a schedule: once its
predicted extra cost would be at most PROBE_BUDGET of the time spent since it was last
measured (never sooner than PROBE_MIN_EVERY publishes, never later than PROBE_MAX_EVERY), so a
probe costs a slow link at most ~10 % more sync time while a mode that became faster is found
within that many publishes. One measurement SHIFT times off its estimate is held back as possible
noise; two in a row (the link or the updates changed) replace the estimate, and the other mode
is measured at the next publish.
"""
from __future__ import annotations

from dataclasses import dataclass, field

EMA = 0.5  # weight of the newest measurement
# Dense must be predicted this much faster before it replaces sparse: near a tie, timing noise
# would otherwise flip the choice, and sparse also spares the link for everything else.
DENSE_MARGIN = 0.9
PROBE_BUDGET = 0.1  # a probe's predicted extra seconds, as a fraction of the seconds since the last one
PROBE_MIN_EVERY = 10  # publishes between two measurements of the mode not in use, at least...
PROBE_MAX_EVERY = 1000  # ... and at most, whatever the probe is predicted to cost
SHIFT = 2.0  # a measurement this many times off its estimate, twice in a row: the conditions changed


@dataclass
class ModeChooser:
    mode: str = "auto"  # "auto" | "sparse" | "dense"
    dense_s_per_byte: float | None = None  # measured on dense publishes
    sparse_s: float | None = None  # recent sparse publishes, end to end
    decisions: int = 0
    # publishes since each mode was last measured ("dense" / "sparse")
    since: dict = field(default_factory=lambda: {"dense": 0, "sparse": 0})
    probes: int = 0  # publishes of the mode predicted slower, made to measure it again
    shifts: int = 0  # times the conditions were seen to change (SHIFT)
    _held: dict = field(default_factory=lambda: {"dense": None, "sparse": None})  # a far-off measurement
    _measure_next: str | None = None  # a mode whose estimate went stale: measured at the next publish

    def choose(self, dense_bytes: int) -> bool:
        """True: publish dense (full weights, raw); False: sparse delta."""
        self.decisions += 1
        if self.mode != "auto":
            return self.mode == "dense"
        if self.decisions == 1:  # a full send anyway: raw measures the link best
            return True
        if self.sparse_s is None:
            return False
        if self.dense_s_per_byte is None:  # forgotten after a change of conditions
            return True
        if self._measure_next is not None:
            stale, self._measure_next = self._measure_next, None
            return stale == "dense"
        dense_s = self.dense_s_per_byte * dense_bytes
        best_dense = dense_s < DENSE_MARGIN * self.sparse_s
        best_s, other_s = (dense_s, self.sparse_s) if best_dense else (self.sparse_s, dense_s)
        since = self.since["sparse" if best_dense else "dense"]
        probe = since >= PROBE_MAX_EVERY or (since >= PROBE_MIN_EVERY and other_s - best_s <= PROBE_BUDGET * since * best_s)
        self.probes += probe
        return best_dense != probe

    def observe(self, dense: bool, seconds: float, dense_bytes: int) -> None:
        """A publish of `dense_bytes` full-weight bytes took `seconds` end to end."""
        mode, other = ("dense", "sparse") if dense else ("sparse", "dense")
        # an estimate PROBE_MIN_EVERY publishes old describes older conditions: a re-measurement
        # far off it replaces it instead of being averaged with it
        stale = self.since[mode] >= PROBE_MIN_EVERY
        self.since[mode], self.since[other] = 0, self.since[other] + 1
        value = seconds / max(1, dense_bytes) if dense else seconds
        old = self.dense_s_per_byte if dense else self.sparse_s
        off = old is not None and not old / SHIFT <= value <= old * SHIFT
        held, self._held[mode] = self._held[mode], None
        if old is None or (off and stale):
            new = value
        elif off and held is None:  # one measurement far off: noise, unless the next one agrees
            self._held[mode] = value
            return
        elif off:  # two in a row: the link or the updates changed, and the other estimate is stale
            new = (held + value) / 2
            self.shifts += 1
            self._measure_next = other
            self.since[other] = max(self.since[other], PROBE_MIN_EVERY)
        else:
            new = EMA * value + (1 - EMA) * old
        if dense:
            self.dense_s_per_byte = new
        else:
            self.sparse_s = new

    def conditions_changed(self) -> None:
        """The caller knows the link (or the workload) changed: both modes are measured again,
        from the next publish on, before either is trusted."""
        self.dense_s_per_byte = self.sparse_s = None
        self.since = {"dense": 0, "sparse": 0}
        self._held = {"dense": None, "sparse": None}
        self._measure_next = None
