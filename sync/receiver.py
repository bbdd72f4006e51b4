"""The receiving end of weight sync, in a rollout worker: fetch, verify, then commit.

An update (sync/transport.py's WeightUpdate) is one or more versions ("steps"), each the parts of
every trainer rank. fetch() downloads the parts one after another, the next one in a background
thread while the current one is decoded (so transfer overlaps decode, and only about two parts'
payloads are in memory at once), and decodes each into a private CPU "shadow" of the weights in
the published dtype, in place with an undo log, checking every checksum there. Only a fully
verified update is replayed onto the target tensors (commit), so a corrupt, incomplete or
mismatched update leaves the target and the version exactly as they were. fetch() can run in a
background thread while the target is in use (async rollouts).

The shadow is keyed like the publish (sync/slices.py): whole tensors from a single trainer rank,
`name[start:stop]` slices from several; commit writes through views of the target tensors.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from sync.codec import DecodedPayload, decode_into, tensor_from_bits
from sync.errors import SyncError, TensorMismatchError, UpdateUnavailableError
from sync.slices import target_views
from sync.transport import Part, WeightUpdate, state_checksum

_INT_NUMPY = {8: np.uint8, 16: np.int16, 32: np.int32, 64: np.int64}


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
    views: dict | None = None  # target views by key, checked against the shadow


class WeightReceiver:
    """`target` tensors (e.g. dict(model.named_parameters())) are updated in place on commit;
    without a target the receiver keeps its own state (`.state`)."""

    def __init__(self, target: dict[str, torch.Tensor] | None = None, version: int | None = None,
                 fetch_timeout_s: float = 600.0):
        """`fetch_timeout_s` applies to updates that do not carry the publisher's own timeout."""
        self.target = target
        self.version = version
        self.fetch_timeout_s = fetch_timeout_s
        self.state: dict[str, torch.Tensor] = {} if target is None else dict(target)
        if target is None and version is not None:
            raise ValueError("a receiver without target tensors starts with no state: version must be None")
        # The shadow mirrors the committed state in the published dtype; only a given version
        # means the target already holds published weights.
        self._shadow = {k: v.detach().cpu().contiguous().clone() for k, v in target.items()} if (target and version is not None) else {}
        self._pending: StagedUpdate | None = None
        # An update cannot create more tensor bytes than the target holds: a payload declaring
        # more is refused before anything is allocated (sync/decoder.py's max_bytes).
        self._max_bytes = None if target is None else max(4096, sum(t.numel() * t.element_size() for t in target.values()))

    # ------------------------------------------------------------ fetch
    def fetch(self, update: WeightUpdate) -> StagedUpdate:
        """Download, decode and verify into the shadow. Raises SyncError subclasses; then the
        shadow, the target and the version are unchanged."""
        self._drop_pending()
        staged = StagedUpdate(update.kind, self.version, update.target_version, 0, 0.0, 0.0)
        timeout_s = update.fetch_timeout_s or self.fetch_timeout_s
        return self._stage(staged, update.steps, lambda part: self._get(part, timeout_s))

    def stage_buckets(self, payloads: list[list[bytes]], kind: str = "delta") -> StagedUpdate:
        """fetch() for payloads already in memory (lists of bucket bytes, applied in order, each
        covering every tensor)."""
        self._drop_pending()
        steps = [[Part(None, buckets)] for buckets in payloads]
        return self._stage(StagedUpdate(kind, self.version, None, 0, 0.0, 0.0), steps, lambda part: part.ref)

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._rollback(self._pending)
            self._pending = None

    @staticmethod
    def _get(part: Part, timeout_s: float) -> list[bytes]:
        import ray

        try:
            return ray.get(part.ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise UpdateUnavailableError(f"a part of the update ({len(part.keys or [])} tensors) did not arrive "
                                         f"within {timeout_s} s (sync.fetch_timeout_s)") from None
        except ray.exceptions.RayError as e:  # the encoding rank failed or died, the object was lost
            raise UpdateUnavailableError(f"a part of the update could not be fetched: {type(e).__name__}: "
                                         f"{str(e).splitlines()[0] if str(e) else ''}") from None

    def _stage(self, staged: StagedUpdate, steps: list[list[Part]], get) -> StagedUpdate:
        version = self.version
        parts = [p for step in steps for p in step]
        fetched = _prefetch(parts, get)
        try:
            for step in steps:
                version = self._stage_step(staged, step, version, fetched)
            if self.target is not None and staged.decoded:
                staged.views = self._views_for_target()
        except BaseException:
            self._rollback(staged)
            raise
        finally:
            fetched.close()
        staged.target_version = version
        self._pending = staged
        return staged

    def _stage_step(self, staged: StagedUpdate, step: list[Part], version: int | None, fetched) -> int:
        """Decode one version's parts (disjoint groups of tensors) into the shadow; the version
        they lead to. A delta step must cover every tensor, a snapshot step defines them."""
        if not step:
            raise SyncError("an update step has no parts")
        start_shadow = self._shadow
        new_shadow: dict = {}
        target = base = None
        for i, part in enumerate(step):
            t0 = time.perf_counter()
            buckets = next(fetched)
            staged.transfer_s += time.perf_counter() - t0
            staged.payload_bytes += sum(len(b) for b in buckets)
            t1 = time.perf_counter()
            before = self._shadow
            keys = list(start_shadow) if part.keys is None else part.keys
            sub = {k: start_shadow[k] for k in keys if k in start_shadow}
            decoded = decode_into(sub, version, buckets, in_place=True, max_bytes=self._max_bytes)
            staged.decoded.append((decoded, before))
            if part.keys is not None and set(decoded.order) != set(part.keys):
                raise TensorMismatchError(f"a part of version {decoded.target_version} covers tensors "
                                          f"{sorted(decoded.order)[:3]}..., not the ones it was announced with")
            if i == 0:
                target, base = decoded.target_version, decoded.base_version
            elif (decoded.target_version, decoded.base_version) != (target, base):
                raise SyncError(f"parts of one update step disagree: {base} -> {target} vs "
                                f"{decoded.base_version} -> {decoded.target_version}")
            overlap = set(decoded.order) & set(new_shadow)
            if overlap:
                raise TensorMismatchError(f"tensors {sorted(overlap)[:3]} arrive in two parts of one update step")
            new_shadow.update(self._install(decoded, sub))
            self._shadow = {**start_shadow, **new_shadow} if base is not None else dict(new_shadow)
            staged.decode_s += time.perf_counter() - t1
        if base is not None and set(new_shadow) != set(start_shadow):
            missing = sorted(set(start_shadow) - set(new_shadow))
            raise TensorMismatchError(f"delta {base} -> {target} leaves tensors {missing[:3]} at the old version")
        self._shadow = new_shadow
        return target

    @staticmethod
    def _install(decoded: DecodedPayload, before: dict) -> dict:
        out = {}
        for name in decoded.order:
            if name in decoded.whole:
                info, shape = decoded.meta[name]
                out[name] = tensor_from_bits(decoded.arrays[name], info, shape)
            else:
                out[name] = before[name]
        return out

    def _views_for_target(self) -> dict[str, torch.Tensor]:
        views = target_views(self.target, list(self._shadow))
        for key, t in self._shadow.items():
            if tuple(views[key].shape) != tuple(t.shape):
                raise TensorMismatchError(f"tensor {key!r}: update has shape {list(t.shape)}, target has {list(views[key].shape)}")
        return views

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
        if staged.views is not None:
            self.state = staged.views
        with torch.no_grad():
            for decoded, _ in staged.decoded:
                self._replay(decoded)
        if self.target is None:  # drop tensors a snapshot or delta removed
            self.state = {k: self.state[k] for k in self._shadow}
        self.version = staged.target_version
        self._pending = None
        return {
            "version": self.version, "kind": staged.kind, "payload_bytes": staged.payload_bytes,
            "transfer_s": staged.transfer_s, "decode_s": staged.decode_s, "apply_s": time.perf_counter() - t0,
        }

    def _replay(self, decoded: DecodedPayload) -> None:
        if self.target is None:  # own state: new tensors are copies of the verified shadow's
            for name in decoded.order:
                if name in decoded.whole or name not in self.state:
                    self.state[name] = self._shadow[name].clone()
        for name in decoded.whole:
            if self.target is not None:
                self.state[name].copy_(self._shadow[name])
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
        once commit() has run); compare with the publisher's state_checksum()."""
        return state_checksum(self._shadow)


def _prefetch(parts: list[Part], get):
    """Yield each part's buckets in order, fetching the next one in a background thread."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="sync-prefetch")
    try:
        future = pool.submit(get, parts[0]) if parts else None
        for i in range(len(parts)):
            buckets = future.result()
            future = pool.submit(get, parts[i + 1]) if i + 1 < len(parts) else None
            yield buckets
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
