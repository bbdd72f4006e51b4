"""The receiving end of weight sync, in a rollout worker: fetch, verify, then commit.

An update (sync/payloads.py WeightUpdate) is one or more versions ("steps"), each the parts of
every trainer rank. fetch() downloads the parts one after another, the next one in a background
thread while the current one is decoded (so transfer overlaps decode, and only about two parts'
payloads are in memory at once), and stages each against the committed weights, which it only
reads (sync/staging.py): a delta stages the positions and new bits of its changes, verified
range by range against the sender's checksums; a snapshot stages the new tensors. No second
copy of the weights is kept: staging memory follows the update's changes, and the target's
committed bits are the base of the next delta (their digests are cached at commit, so a delta's
base check costs nothing). commit() writes the staged changes into the target (a scatter of the
changed elements), so a corrupt, incomplete or mismatched update leaves the target and the
version exactly as they were. fetch() can run in a background thread while the target is in use
(async rollouts): it never writes the target.

Keys follow the publish (sync/slices.py): whole tensors from a single trainer rank,
`name[start:stop]` slices from several; commit writes through views of the target tensors.
"""
from __future__ import annotations

import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from sync.checksum import checksum_entry, combine_checksums
from sync.delta_kernels import scatter
from sync.dtypes import info_for, tensor_from_bits
from sync.errors import (CorruptBucketError, CorruptTargetError, SyncError, TensorMismatchError,
                         UpdateUnavailableError, VersionMismatchError)
from sync.payloads import Part, SyncStats, WeightUpdate
from sync.slices import parse_key, target_views
from sync.staging import Base, KeyChange, patched_digest, stage_payload
from sync.workspace import workers

log = logging.getLogger(__name__)
# A mirrored (device) target: bytes compared with the mirror per commit, beyond the changes.
VERIFY_BYTES_PER_COMMIT = 4 << 20
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
    changes: dict = field(default_factory=dict)  # key -> KeyChange against the committed bits
    meta: dict = field(default_factory=dict)  # key -> (DtypeInfo, shape) once committed
    views: dict | None = None  # target views by key, checked against `meta`

    @property
    def staged_bytes(self) -> int:
        """Memory the staged changes hold (what fetch() adds until commit)."""
        return sum(c.nbytes() for c in self.changes.values())

    def changed_tensors(self) -> list[str]:
        """Names of the target tensors whose bits commit() changes (a key `name[start:stop]`
        counts for `name`), in first-seen order: what an engine must be handed afterwards."""
        names: dict[str, None] = {}
        for key, ch in self.changes.items():
            if ch.whole is not None or ch.changed:
                names[parse_key(key)[0]] = None
        return list(names)


@dataclass
class SharedUpdate:
    """An update as one receiver staged and verified it, for the other receivers at the same
    version to commit without downloading or decoding it again (WeightReceiver.adopt). Put in
    the object store of that receiver's node, its arrays are read there without a copy, so a
    node with K rollout workers decodes each update once, not K times."""

    kind: str
    base_version: int | None
    target_version: int | None
    payload_bytes: int
    base_digests: dict  # key -> digest of the bits the update was staged against (deltas)
    changes: dict  # key -> KeyChange
    meta: dict  # key -> (DtypeInfo, shape)


class WeightReceiver:
    """`target` tensors (e.g. dict(model.named_parameters())) are updated in place on commit;
    without a target the receiver keeps its own state (`.state`)."""

    def __init__(self, target: dict[str, torch.Tensor] | None = None, version: int | None = None,
                 fetch_timeout_s: float = 600.0, fetch_attempts: int = 1, mirror: bool | None = None,
                 verify_bytes_per_commit: int = VERIFY_BYTES_PER_COMMIT):
        """`fetch_timeout_s` and `fetch_attempts` apply to updates that do not carry the
        publisher's own (sync.fetch_timeout_s, sync.fetch_attempts). A given `version` means
        the target already holds that version's published weights.

        `mirror` (default: when a target tensor is not in CPU memory, e.g. on a GPU): keep a
        host copy of the committed bits in the published dtype, which staging and followers'
        verification read instead of the target, so a delta reads back from the device only
        the elements it changed (each write checked) and `verify_bytes_per_commit` more bytes,
        compared with the copy, a window that moves through the whole model commit by commit.
        It costs host memory the size of the published weights. rehash() and reread_checksum()
        always read the target itself."""
        self.target = target
        self.version = version
        self.fetch_timeout_s = fetch_timeout_s
        self.fetch_attempts = fetch_attempts
        self.state: dict[str, torch.Tensor] = {} if target is None else dict(target)
        if target is None and version is not None:
            raise ValueError("a receiver without target tensors starts with no state: version must be None")
        # The committed layout (published key -> dtype, shape), the tensor (or view) each key
        # lives in, and the digests of their bits where known.
        self._meta: dict = {}
        self._views: dict[str, torch.Tensor] = {}
        if target is not None and version is not None:
            self._meta = {k: (info_for(t.dtype, k), tuple(t.shape)) for k, t in target.items()}
            self._views = dict(target)
        self._digests: dict[str, str] = {}
        self._pending: StagedUpdate | None = None
        self.corrupt_events = 0  # times its committed weights were found altered (_corrupt)
        self._mirror_on = bool(mirror) if mirror is not None else (
            target is not None and any(t.device.type != "cpu" for t in target.values()))
        if self._mirror_on and target is None:
            raise ValueError("a mirror of the committed bits needs target tensors")
        self._mirror: dict[str, np.ndarray] = {}  # key -> committed bits (flat, published dtype)
        self._verify_bytes = verify_bytes_per_commit
        self._verify_cursor = 0  # where the next commit's window of device bytes starts
        # An update cannot create more tensor bytes than the target holds: a payload declaring
        # more is refused before anything is allocated (sync/decoder.py's max_bytes).
        self._max_bytes = None if target is None else max(4096, sum(t.numel() * t.element_size() for t in target.values()))

    # ------------------------------------------------------------ fetch
    def fetch(self, update: WeightUpdate) -> StagedUpdate:
        """Download, decode and verify against the committed weights (only read). Raises
        SyncError subclasses; then the target and the version are unchanged."""
        self._pending = None
        staged = StagedUpdate(update.kind, self.version, update.target_version, 0, 0.0, 0.0)
        timeout_s = update.fetch_timeout_s or self.fetch_timeout_s
        attempts = update.fetch_attempts or self.fetch_attempts
        return self._stage(staged, update.steps, lambda part: self._get(part, timeout_s, attempts))

    def stage_buckets(self, payloads: list[list[bytes]], kind: str = "delta",
                      part_keys: list[list[str]] | None = None) -> StagedUpdate:
        """fetch() for payloads already in memory (lists of bucket bytes): applied in order,
        each covering every tensor; or, with `part_keys`, the parts of one version, payload i
        covering the keys part_keys[i] (a publish's parts, sync/publisher.py)."""
        self._pending = None
        if part_keys is not None:
            if len(part_keys) != len(payloads):
                raise ValueError(f"{len(payloads)} payloads but {len(part_keys)} key lists")
            steps = [[Part(list(keys), buckets) for keys, buckets in zip(part_keys, payloads)]]
        else:
            steps = [[Part(None, buckets)] for buckets in payloads]
        return self._stage(StagedUpdate(kind, self.version, None, 0, 0.0, 0.0), steps, lambda part: part.ref)

    @staticmethod
    def _get(part: Part, timeout_s: float, attempts: int = 1) -> list[bytes]:
        """A part's buckets. A wait that times out is made again (a stalled link that comes back
        only delays the update) up to `attempts` times; an object Ray reports lost or failed
        (its rank or node died) is an error at once."""
        import ray

        for attempt in range(1, attempts + 1):
            try:
                return ray.get(part.ref, timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                if attempt == attempts:
                    raise UpdateUnavailableError(
                        f"a part of the update ({len(part.keys or [])} tensors) did not arrive within {attempts} "
                        f"wait(s) of {timeout_s} s (sync.fetch_attempts x sync.fetch_timeout_s)") from None
                log.warning("a part of the update did not arrive within %s s (wait %d of %d); waiting again",
                            timeout_s, attempt, attempts)
            except ray.exceptions.RayError as e:  # the encoding rank failed or died, the object was lost
                raise UpdateUnavailableError(f"a part of the update could not be fetched: {type(e).__name__}: "
                                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
        raise AssertionError("unreachable")

    def _stage(self, staged: StagedUpdate, steps: list[list[Part]], get) -> StagedUpdate:
        self._ensure_mirror()
        version, meta = self.version, dict(self._meta)
        changes: dict[str, KeyChange] = {}
        parts = [p for step in steps for p in step]
        fetched = _prefetch(parts, get)
        try:
            for step in steps:
                try:
                    version, meta, changes = self._stage_step(staged, step, version, meta, changes, fetched)
                except CorruptBucketError as e:
                    # A delta's result is checked range by range against the sender's checksums,
                    # built on this receiver's committed bits: when those bits are not the ones
                    # committed, an intact payload fails that check. Which of the two it is, only
                    # a re-read of the committed bits tells.
                    if self.version is not None and self._meta and not self.rehash():
                        raise self._corrupt(f"its committed weights of version {self.version} changed since "
                                            "they were committed (an update built on them failed its checksum)") from e
                    raise
            if self.target is not None and changes:
                staged.views = self._views_for_target(meta)
            for key, ch in changes.items():  # commit's scatter trusts the (sorted) positions
                if ch.pos is not None and ch.changed and (ch.pos[0] < 0 or ch.pos[-1] >= int(np.prod(ch.shape, dtype=np.int64))):
                    raise TensorMismatchError(f"tensor {key!r}: staged positions outside its {list(ch.shape)} elements")
        finally:
            fetched.close()
        staged.target_version, staged.meta, staged.changes = version, meta, changes
        self._pending = staged
        return staged

    def _stage_step(self, staged: StagedUpdate, step: list[Part], version: int | None, meta: dict,
                    changes: dict, fetched) -> tuple[int | None, dict, dict]:
        """Stage one version's parts (disjoint groups of keys) over the changes of the steps
        before it. A delta step must cover every key, a snapshot step defines them."""
        if not step:
            raise SyncError("an update step has no parts")
        base = Base(meta, self._read, self._digests, changes)
        out: dict[str, KeyChange] = {}
        target = base_version = None
        for i, part in enumerate(step):
            t0 = time.perf_counter()
            buckets = next(fetched)
            staged.transfer_s += time.perf_counter() - t0
            staged.payload_bytes += sum(len(b) for b in buckets)
            t1 = time.perf_counter()
            sp = stage_payload(buckets, version, base, part.keys, max_bytes=self._max_bytes)
            if part.keys is not None and set(sp.order) != set(part.keys):
                raise TensorMismatchError(f"a part of version {sp.target_version} covers tensors "
                                          f"{sorted(sp.order)[:3]}..., not the ones it was announced with")
            if i == 0:
                target, base_version = sp.target_version, sp.base_version
            elif (sp.target_version, sp.base_version) != (target, base_version):
                raise SyncError(f"parts of one update step disagree: {base_version} -> {target} vs "
                                f"{sp.base_version} -> {sp.target_version}")
            overlap = set(sp.order) & set(out)
            if overlap:
                raise TensorMismatchError(f"tensors {sorted(overlap)[:3]} arrive in two parts of one update step")
            out.update(sp.changes)
            staged.decode_s += time.perf_counter() - t1
        if base_version is not None and set(out) != set(meta):
            missing = sorted(set(meta) - set(out))
            raise TensorMismatchError(f"delta {base_version} -> {target} leaves tensors {missing[:3]} at the old version")
        new_meta = {k: (c.info, c.shape) for k, c in out.items()}
        return target, new_meta, out

    def _read(self, key: str, start: int, stop: int) -> np.ndarray:
        """Committed bits [start, stop) of `key` in its published dtype, read-only: from the
        mirror when there is one, else from the target (_read_target)."""
        if self._mirror_on:
            if key not in self._mirror:
                self._ensure_mirror()
            return self._mirror[key][start:stop]
        return self._read_target(key, start, stop)

    def _ensure_mirror(self) -> None:
        """The mirror of every committed key (built by one read of the target: at the first
        update of a receiver given a `version`, or after its weights were found altered)."""
        if self._mirror_on and self.version is not None:
            for key, (_, shape) in self._meta.items():
                if key not in self._mirror:
                    n = int(np.prod(shape, dtype=np.int64))
                    self._mirror[key] = np.array(self._read_target(key, 0, n), copy=True)

    def _read_target_at(self, key: str, pos: np.ndarray) -> np.ndarray:
        """The target's bits of `key` at flat positions `pos`, in the published dtype."""
        info, _ = self._meta[key]
        flat = self._views[key].detach().reshape(-1)
        vals = flat[torch.from_numpy(pos).to(flat.device)].to(info.torch_dtype).cpu().contiguous()
        return vals.view(info.int_view).numpy().view(info.uint)

    def _read_target(self, key: str, start: int, stop: int) -> np.ndarray:
        """The target's bits [start, stop) of `key` in its published dtype (a view when the
        target is a CPU tensor of that dtype, else a converted copy of just that range)."""
        info, _ = self._meta[key]
        t = self._views[key].detach()
        if t.device.type == "cpu" and t.dtype == info.torch_dtype and t.is_contiguous():
            arr = t.view(-1)[start:stop].view(info.int_view).numpy().view(info.uint)
        else:
            part = t.reshape(-1)[start:stop].to(info.torch_dtype).cpu().contiguous()
            arr = part.view(info.int_view).numpy().view(info.uint)
        if arr.ctypes.data % 8:  # the kernels read 8-byte-aligned arrays
            arr = arr.copy()
        return arr

    def _views_for_target(self, meta: dict) -> dict[str, torch.Tensor]:
        assert self.target is not None, "only a receiver with a target has views into it"
        views = target_views(self.target, list(meta))
        for key, (_, shape) in meta.items():
            if tuple(views[key].shape) != tuple(shape):
                raise TensorMismatchError(f"tensor {key!r}: update has shape {list(shape)}, target has {list(views[key].shape)}")
        return views

    # ------------------------------------------------------------ sharing a staged update
    def share(self, staged: StagedUpdate) -> SharedUpdate:
        """The pending `staged` update, for receivers that hold the same version (adopt())."""
        if staged is not self._pending:
            raise SyncError("only the receiver's pending update can be shared")
        base = Base(self._meta, self._read, self._digests)
        digests = {} if staged.kind == "snapshot" else {k: base.digest(k) for k in self._meta}
        return SharedUpdate(staged.kind, staged.base_version, staged.target_version, staged.payload_bytes, digests,
                            staged.changes, staged.meta)

    def adopt(self, shared: SharedUpdate) -> StagedUpdate:
        """Stage an update another receiver staged and verified (share()). It applies only when
        this receiver holds exactly the bits that one staged against (same keys and digests);
        otherwise TensorMismatchError, and this receiver should fetch the update itself. The
        digests compared are the ones cached at commit: only the receiver writes its target
        (a rollout engine never does), and rehash() re-reads them when in doubt."""
        self._pending = None
        t0 = time.perf_counter()
        self._ensure_mirror()
        if shared.kind != "snapshot":  # a snapshot replaces everything; anything else needs the same base
            if shared.base_version != self.version:
                raise VersionMismatchError(f"a shared update from version {shared.base_version}; this receiver is at {self.version}")
            base = Base(self._meta, self._read, self._digests)
            if set(shared.base_digests) != set(self._meta) or any(base.digest(k) != h for k, h in shared.base_digests.items()):
                raise TensorMismatchError("this receiver's weights differ from the ones the shared update was staged against")
            self._verify_adopted(shared.changes)
        staged = StagedUpdate(shared.kind, self.version, shared.target_version, 0, 0.0, 0.0,
                              changes=dict(shared.changes), meta=dict(shared.meta))
        if self.target is not None and staged.changes:
            staged.views = self._views_for_target(staged.meta)
        staged.decode_s = time.perf_counter() - t0
        self._pending = staged
        return staged

    def _verify_adopted(self, changes: dict) -> None:
        """A follower verifies what it will commit, as the receiver that staged the update did:
        each key's result (this receiver's own committed bits with the staged changes laid over
        them, built block by block without writing anything) must have the sender's digest. The
        base check above compared digests cached at commit; this reads the bits themselves, so a
        target written behind the receiver's back is caught before anything is built on it."""
        keys = [k for k, ch in changes.items() if ch.whole is None]
        if not keys:
            return

        def check(key: str) -> bool:
            ch = changes[key]
            n = int(np.prod(self._meta[key][1], dtype=np.int64))
            pos = ch.pos if ch.pos is not None else np.empty(0, np.int64)
            vals = ch.vals if ch.vals is not None else np.empty(0, ch.info.uint)
            return patched_digest(self._read(key, 0, n), pos, vals) == ch.xxh

        if workers() > 1 and len(keys) > 1:
            with ThreadPoolExecutor(workers()) as pool:
                ok = list(pool.map(check, keys))
        else:
            ok = [check(k) for k in keys]
        bad = [k for k, good in zip(keys, ok) if not good]
        if not bad:
            return
        if not self.rehash():
            raise self._corrupt(f"its committed weights of version {self.version} changed since they were "
                                f"committed (tensor {bad[0]!r} and {len(bad) - 1} more fail the shared update's checksum)")
        raise CorruptBucketError(f"a shared update's changes to tensor {bad[0]!r} do not give the digest it was "
                                 "staged with on this receiver's (intact) weights")

    def _corrupt(self, why: str) -> CorruptTargetError:
        """Forget the version and the cached digests of weights found altered: until a snapshot
        restores them, no delta is built on them and nothing reports them as a version."""
        version = self.version
        self.version, self._digests, self._pending = None, {}, None
        self._mirror = {}  # rebuilt from the snapshot that restores the weights
        self.corrupt_events += 1
        log.warning("weight receiver at version %s: %s; it takes only a snapshot now", version, why)
        return CorruptTargetError(f"receiver at version {version}: {why}; only a snapshot restores it")

    def rehash(self) -> bool:
        """Re-read the committed weights' digests (they are cached at commit); False when they
        differ from the cached ones (something else wrote the target)."""
        cached = dict(self._digests)
        self._digests = {}
        base = Base(self._meta, self._read_target, self._digests)
        return all(base.digest(k) == cached.get(k, base.digest(k)) for k in self._meta)

    # ------------------------------------------------------------ commit
    def commit(self, staged: StagedUpdate) -> SyncStats:
        """Write a verified update into the target (or own state). Cheap for a delta: a
        scatter of the changed elements. The stats carry the checksum of the committed state
        (from the digests verified while staging: no re-read)."""
        if staged is not self._pending:
            raise SyncError("commit of an update that is not the receiver's pending one (stale or already committed)")
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.target is not None:
                views = staged.views if staged.views is not None else self._views
                for key, ch in staged.changes.items():
                    _write(views[key], ch)
                self._views = views
            else:  # own state: new tensors hold the staged bits, others are edited in place
                for key, ch in staged.changes.items():
                    if ch.whole is not None or key not in self.state:
                        whole = ch.whole if ch.whole.flags.writeable else ch.whole.copy()
                        self.state[key] = tensor_from_bits(whole, ch.info, ch.shape)
                    else:
                        _write(self.state[key], ch)
                self.state = {k: self.state[k] for k in staged.meta}
                self._views = self.state
        self._meta = staged.meta  # an update without changes staged the committed layout itself
        digests = {**self._digests, **{k: c.xxh for k, c in staged.changes.items()}}
        self._digests = {k: v for k, v in digests.items() if k in self._meta}
        self.version = staged.target_version
        self._pending = None
        if self._mirror_on:
            self._commit_mirror(staged)
        return SyncStats(version=self.version, kind=staged.kind, payload_bytes=staged.payload_bytes,
                         transfer_s=staged.transfer_s, decode_s=staged.decode_s, apply_s=time.perf_counter() - t0,
                         staged_bytes=staged.staged_bytes, checksum=self.state_checksum())

    def _commit_mirror(self, staged: StagedUpdate) -> None:
        """The committed changes into the mirror; then the device's bits at every changed
        position read back and compared, and a window of `verify_bytes_per_commit` more bytes
        compared with the mirror (the window moves on every commit, so every byte of the target
        is compared in turn). A difference: the target does not hold what was committed."""
        for key, ch in staged.changes.items():
            if ch.whole is not None:
                self._mirror[key] = np.array(ch.whole, copy=True)
            elif ch.changed:
                scatter(self._mirror[key], ch.pos, ch.vals)
        self._mirror = {k: v for k, v in self._mirror.items() if k in self._meta}
        for key, ch in staged.changes.items():
            if ch.whole is None and ch.changed and not np.array_equal(self._read_target_at(key, ch.pos), ch.vals):
                raise self._corrupt(f"tensor {key!r} does not hold the {ch.changed} elements just written to it")
        bad = self._compare_window()
        if bad is not None:
            raise self._corrupt(f"tensor {bad!r} differs from the bits committed to it")

    def _compare_window(self) -> str | None:
        """Compare the next `verify_bytes_per_commit` bytes of the target (keys laid end to end,
        wrapping around) with the mirror; the key of a difference, or None."""
        keys = list(self._meta)
        sizes = [self._mirror[k].nbytes for k in keys]
        total = sum(sizes)
        if total == 0 or self._verify_bytes <= 0:
            return None
        start = self._verify_cursor % total
        stop = start + min(self._verify_bytes, total)
        self._verify_cursor = stop % total
        spans = [(start, min(stop, total))] + ([(0, stop - total)] if stop > total else [])
        offset = 0
        for key, size in zip(keys, sizes):
            for lo, hi in spans:
                lo, hi = max(lo, offset), min(hi, offset + size)
                if lo < hi and not self._window_equal(key, lo - offset, hi - offset):
                    return key
            offset += size
        return None

    def _window_equal(self, key: str, lo_byte: int, hi_byte: int) -> bool:
        mirror = self._mirror[key]
        item = mirror.itemsize
        start, stop = lo_byte // item, -(-hi_byte // item)
        return np.array_equal(self._read_target(key, start, stop), mirror[start:stop])

    def apply(self, update: WeightUpdate) -> SyncStats:
        return self.commit(self.fetch(update))

    def state_checksum(self) -> str:
        """Checksum of the committed state in the published dtype (cached digests; compare with
        the publisher's state_checksum())."""
        return self._checksum(self._digests, self._read)

    def reread_checksum(self) -> str:
        """state_checksum() of the committed tensors' bits as they are now, every one read from
        the target and digested again (no digest cached at commit, no mirror is used or
        changed): what a check that the target really holds the published weights must compare."""
        return self._checksum({}, self._read_target)

    def _checksum(self, digests: dict, read) -> str:
        base = Base(self._meta, read, digests)
        return combine_checksums({key: checksum_entry(key, info.name, shape, base.digest(key))
                                  for key, (info, shape) in self._meta.items()})


def _write(t: torch.Tensor, ch: KeyChange) -> None:
    """Write a key's staged change into tensor (or view) `t`, converting dtype and device."""
    info = ch.info
    if ch.whole is not None:
        with warnings.catch_warnings():  # a shared update's arrays are read-only in the object store; only read here
            warnings.simplefilter("ignore", UserWarning)
            t.copy_(tensor_from_bits(ch.whole, info, tuple(t.shape)))
        return
    if ch.pos is None or ch.pos.shape[0] == 0:
        return
    assert ch.vals is not None, "a change is a whole key or positions and values"
    if t.device.type == "cpu" and t.dtype == info.torch_dtype and t.is_contiguous():
        # a numba scatter into a view of the target: several times faster than numpy's fancy
        # assignment or torch's index_put for scattered elements
        scatter(t.detach().view(-1).view(info.int_view).numpy().view(info.uint), ch.pos, ch.vals)
        return
    flat = t.view(-1)
    src = torch.from_numpy(ch.vals.view(_INT_NUMPY[info.width]))
    if t.dtype == info.torch_dtype:
        dst = flat.view(info.int_view)
    else:
        dst, src = flat, src.view(info.torch_dtype).to(t.dtype)
    dst[torch.from_numpy(ch.pos).to(t.device)] = src.to(t.device)


def _prefetch(parts: list[Part], get):
    """Yield each part's buckets in order, fetching the next one in a background thread."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="sync-prefetch")
    try:
        future = pool.submit(get, parts[0]) if parts else None
        for i in range(len(parts)):
            assert future is not None  # submitted for every part
            buckets = future.result()
            future = pool.submit(get, parts[i + 1]) if i + 1 < len(parts) else None
            yield buckets
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
