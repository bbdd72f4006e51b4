"""Weight sync over the Ray object store: a publisher in the trainer, receivers in rollout workers.

The publisher encodes each published version as a delta against the previous one (a snapshot
the first time), puts the buckets into the object store, and keeps the last `history` deltas.
A receiver asks for an update from its own version: the latest delta when it is one behind, the
chain of deltas it missed, or a snapshot, whichever is fewer bytes.

The receiver decodes into a private CPU "shadow" of its weights, in place with an undo log, and
checks every checksum there (fetch). Only a fully verified update is then replayed onto the
target tensors (commit), so a corrupt or mismatched update leaves the target and the version
exactly as they were. fetch() can run in a background thread while the target is in use.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

from sync.codec import DecodedPayload, decode_into, encode, tensor_from_bits
from sync.config import SyncConfig
from sync.dtypes import bits_of, info_for
from sync.errors import SyncError, TensorMismatchError
from sync.format import digest

_INT_NUMPY = {8: np.uint8, 16: np.int16, 32: np.int32, 64: np.int64}


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """Digest of names, dtypes, shapes and bit patterns of a state dict (order-independent)."""
    h = xxhash.xxh3_64()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}|{info_for(t.dtype, name).name}|{list(t.shape)}|{digest(bits_of(t))};".encode())
    return h.hexdigest()


@dataclass
class WeightUpdate:
    """A small picklable handle. `payloads` holds one list of bucket ObjectRefs per payload, to be
    applied in order; the refs are nested in lists so Ray passes them through unresolved."""

    kind: str  # "none" | "delta" | "chain" | "snapshot"
    base_version: int | None
    target_version: int | None
    payload_bytes: int
    payloads: list = field(default_factory=list)


@dataclass
class _Published:
    base_version: int | None
    target_version: int
    refs: list
    payload_bytes: int


def _to_published(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Owned CPU copies in the published dtype (floating tensors converted, others kept)."""
    out = {}
    for name, t in state.items():
        src = t.detach()
        c = src.to(dtype) if src.is_floating_point() and src.dtype != dtype else src
        c = c.cpu().contiguous()
        if c.data_ptr() == src.data_ptr() and c.numel() > 0:
            c = c.clone()
        out[name] = c
    return out


class WeightPublisher:
    """Lives in the trainer (rank 0). Publishes versions as deltas in the Ray object store."""

    def __init__(self, cfg: SyncConfig | None = None):
        self.cfg = cfg or SyncConfig()
        self.dtype = getattr(torch, self.cfg.published_dtype)
        self.version: int | None = None
        self._last: dict[str, torch.Tensor] | None = None
        self._history: deque[_Published] = deque(maxlen=max(1, self.cfg.history))
        self._snapshot: _Published | None = None

    def publish(self, state: dict[str, torch.Tensor], version: int) -> dict:
        import ray

        if self.version is not None and version <= self.version:
            raise ValueError(f"publish version {version} must be greater than the last one ({self.version})")
        new = _to_published(state, self.dtype)
        t0 = time.perf_counter()
        base = None if self._last is None else self.version
        buckets = encode(self._last, new, base_version=base, target_version=version,
                         level=self.cfg.level, bucket_bytes=self.cfg.bucket_bytes)
        encode_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        refs = [ray.put(b) for b in buckets]
        put_s = time.perf_counter() - t1
        payload = sum(len(b) for b in buckets)
        record = _Published(base, version, refs, payload)
        if base is None:
            self._snapshot = record
        else:
            self._history.append(record)
        self._last, self.version = new, version
        dense = sum(t.numel() * t.element_size() for t in new.values())
        return {
            "version": version, "kind": "snapshot" if base is None else "delta",
            "payload_bytes": payload, "dense_bytes": dense, "ratio": dense / max(1, payload),
            "encode_s": encode_s, "put_s": put_s, "buckets": len(buckets),
        }

    def _snapshot_now(self) -> _Published:
        import ray

        if self._snapshot is None or self._snapshot.target_version != self.version:
            buckets = encode(None, self._last, base_version=None, target_version=self.version,
                             level=self.cfg.level, bucket_bytes=self.cfg.bucket_bytes)
            self._snapshot = _Published(None, self.version, [ray.put(b) for b in buckets], sum(map(len, buckets)))
        return self._snapshot

    def update_for(self, receiver_version: int | None) -> WeightUpdate:
        """The cheapest update that brings a receiver at `receiver_version` to the latest version."""
        if self.version is None or receiver_version == self.version:
            return WeightUpdate("none", receiver_version, receiver_version, 0)
        chain: list[_Published] = []
        if receiver_version is not None:
            want = self.version
            for rec in reversed(self._history):
                if rec.target_version != want:
                    break
                chain.append(rec)
                want = rec.base_version
                if want == receiver_version:
                    break
            if want != receiver_version:
                chain = []
        chain.reverse()
        if len(chain) == 1:
            rec = chain[0]
            return WeightUpdate("delta", rec.base_version, rec.target_version, rec.payload_bytes, [list(rec.refs)])
        snap = self._snapshot_now()
        chain_bytes = sum(r.payload_bytes for r in chain)
        if chain and chain_bytes < snap.payload_bytes:
            return WeightUpdate("chain", receiver_version, self.version, chain_bytes, [list(r.refs) for r in chain])
        return WeightUpdate("snapshot", None, self.version, snap.payload_bytes, [list(snap.refs)])

    def state_checksum(self) -> str:
        """Checksum of the last published (published-dtype) state."""
        return state_checksum(self._last or {})


@dataclass
class StagedUpdate:
    """A fetched, decoded and verified update, not yet visible in the target."""

    kind: str
    base_version: int | None
    target_version: int | None
    payload_bytes: int
    transfer_s: float
    decode_s: float
    decoded: list = field(default_factory=list)  # [(DecodedPayload, shadow dict before it)]


class WeightReceiver:
    """Lives in a rollout worker. `target` tensors (e.g. dict(model.named_parameters())) are
    updated in place on commit; without a target the receiver keeps its own state (`.state`)."""

    def __init__(self, target: dict[str, torch.Tensor] | None = None, version: int | None = None):
        self.target = target
        self.version = version
        self.state: dict[str, torch.Tensor] = {} if target is None else target
        if target is None and version is not None:
            raise ValueError("a receiver without target tensors starts with no state: version must be None")
        # The shadow mirrors the committed state in the published dtype; only a given version
        # means the target already holds published weights.
        self._shadow = {k: v.detach().cpu().contiguous().clone() for k, v in target.items()} if (target and version is not None) else {}
        self._pending: StagedUpdate | None = None

    # ------------------------------------------------------------ fetch
    def fetch(self, update: WeightUpdate) -> StagedUpdate:
        """Download, decode and verify into the shadow. Raises SyncError subclasses; then the
        shadow, the target and the version are unchanged."""
        import ray

        if self._pending is not None:
            self._rollback(self._pending)
            self._pending = None
        t0 = time.perf_counter()
        payloads = [ray.get(list(refs)) for refs in update.payloads]
        transfer_s = time.perf_counter() - t0
        staged = StagedUpdate(update.kind, self.version, update.target_version, update.payload_bytes, transfer_s, 0.0)
        return self._stage(staged, payloads)

    def stage_buckets(self, payloads: list[list[bytes]], kind: str = "delta") -> StagedUpdate:
        """fetch() for payloads already in memory (lists of bucket bytes, applied in order)."""
        if self._pending is not None:
            self._rollback(self._pending)
            self._pending = None
        nbytes = sum(len(b) for p in payloads for b in p)
        return self._stage(StagedUpdate(kind, self.version, None, nbytes, 0.0, 0.0), payloads)

    def _stage(self, staged: StagedUpdate, payloads: list) -> StagedUpdate:
        t1 = time.perf_counter()
        version = self.version
        try:
            for buckets in payloads:
                before = self._shadow
                decoded = decode_into(self._shadow, version, buckets, in_place=True)
                staged.decoded.append((decoded, before))
                self._shadow = self._install(decoded, before)
                version = decoded.target_version
            if self.target is not None and staged.decoded:
                self._check_target_fits()
        except BaseException:
            self._rollback(staged)
            raise
        staged.target_version = version
        staged.decode_s = time.perf_counter() - t1
        self._pending = staged
        return staged

    @staticmethod
    def _install(decoded: DecodedPayload, before: dict) -> dict:
        shadow = {}
        for name in decoded.order:
            if name in decoded.whole:
                info, shape = decoded.meta[name]
                shadow[name] = tensor_from_bits(decoded.arrays[name], info, shape)
            else:
                shadow[name] = before[name]
        return shadow

    def _check_target_fits(self) -> None:
        names, have = set(self._shadow), set(self.target)
        if names != have:
            raise TensorMismatchError(
                f"update's tensors differ from the target's: missing {sorted(names - have)[:5]}, extra {sorted(have - names)[:5]}"
            )
        for name, t in self._shadow.items():
            if tuple(self.target[name].shape) != tuple(t.shape):
                raise TensorMismatchError(f"tensor {name!r}: update has shape {list(t.shape)}, target has {list(self.target[name].shape)}")

    def _rollback(self, staged: StagedUpdate) -> None:
        for decoded, before in reversed(staged.decoded):
            decoded.rollback()
            self._shadow = before
        staged.decoded.clear()

    # ------------------------------------------------------------ commit
    def commit(self, staged: StagedUpdate) -> dict:
        """Replay a verified update onto the target (or own state). Cheap: only changed elements."""
        if staged is not self._pending:
            raise SyncError("commit of an update that is not the receiver's pending one (stale or already committed)")
        t0 = time.perf_counter()
        with torch.no_grad():
            for decoded, _ in staged.decoded:
                self._replay(decoded)
        self.version = staged.target_version
        self._pending = None
        return {
            "version": self.version, "kind": staged.kind, "payload_bytes": staged.payload_bytes,
            "transfer_s": staged.transfer_s, "decode_s": staged.decode_s, "apply_s": time.perf_counter() - t0,
        }

    def _replay(self, decoded: DecodedPayload) -> None:
        if self.target is None:
            state = {}
            for name in decoded.order:
                if name in decoded.whole or name not in self.state:
                    state[name] = self._shadow[name].clone()
                else:
                    state[name] = self.state[name]
            self.state = state
        for name in decoded.whole:
            if self.target is not None:
                self.target[name].copy_(self._shadow[name])
        for name, op, a, vals in decoded.ops:
            if name in decoded.whole:
                continue
            info, _ = decoded.meta[name]
            t = self.state[name]
            if t.device.type == "cpu" and t.dtype == info.torch_dtype and t.is_contiguous():
                # numpy's fancy assignment into a view of the target: several times faster
                # than torch's index_put for a scatter of scattered elements
                dst_np = t.detach().view(-1).view(info.int_view).numpy().view(info.uint)
                if op == "scatter":
                    dst_np[a] = vals
                else:
                    dst_np[a : a + vals.shape[0]] = vals
                continue
            flat = t.view(-1)
            src = torch.from_numpy(vals.view(_INT_NUMPY[info.width]))
            if t.dtype == info.torch_dtype:
                dst = flat.view(info.int_view)
            else:
                dst, src = flat, src.view(info.torch_dtype).to(t.dtype)
            src = src.to(t.device)
            if op == "scatter":
                dst[torch.from_numpy(a).to(t.device)] = src
            else:
                dst[a : a + src.numel()] = src

    def apply(self, update: WeightUpdate) -> dict:
        return self.commit(self.fetch(update))

    def state_checksum(self) -> str:
        """Checksum of the latest verified state in the published dtype (the committed state
        once commit() has run); compare with WeightPublisher.state_checksum()."""
        return state_checksum(self._shadow)
