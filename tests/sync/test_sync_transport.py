"""Weight sync over Ray across two nodes: a publisher actor on the head node trains a small GPT
(fp32 AdamW masters) and publishes bf16 weights; three receiver actors on the second node hold
bf16 copies of the model and apply updates in place. One receiver lags and catches up by a chain
of deltas or a snapshot."""
from __future__ import annotations

import sys

import pytest
import torch

from sync.config import SyncConfig
from sync.errors import SyncError, VersionMismatchError
from sync.checksum import state_checksum
from sync.payloads import Part, WeightUpdate
from sync.receiver import WeightReceiver
from sync.transport import WeightPublisher
from cluster_nodes import HEAD_NODE, SECOND_NODE

# Test modules are not importable on Ray workers: ship this module's classes by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

MODEL = dict(n_layer=2, n_head=2, n_embd=64, block_size=32)


def _model():
    from models import build_model
    from models.config import ModelConfig

    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(**MODEL))
    return model


class Trainer:
    def __init__(self, history: int):
        self.model = _model()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.pub = WeightPublisher(SyncConfig(level="fast", history=history, bucket_bytes=64 << 10))
        self.gen = torch.Generator().manual_seed(1)

    def step_and_publish(self, version: int) -> dict:
        if version > 0:
            x = torch.randint(0, 256, (4, 32), generator=self.gen)
            logits = self.model(x).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
        return self.pub.publish(dict(self.model.named_parameters()), version)

    def update_for(self, version):
        return self.pub.update_for(version)

    def checksum(self) -> str:
        return self.pub.state_checksum()


class Rollout:
    def __init__(self):
        self.model = _model().to(torch.bfloat16)
        self.receiver = WeightReceiver(dict(self.model.named_parameters()))

    def version(self):
        return self.receiver.version

    def apply(self, update) -> dict:
        return self.receiver.apply(update)

    def checksums(self) -> tuple[str, str]:
        # the verified shadow and the model's own parameters must both match the sender
        return self.receiver.state_checksum(), state_checksum(dict(self.model.named_parameters()))

    def node(self):
        import ray

        return ray.get_runtime_context().get_node_id()


@pytest.mark.ray
def test_three_receivers_on_second_node_follow_twenty_publishes(ray_cluster):
    import ray

    trainer = ray.remote(num_cpus=0.5, resources={HEAD_NODE: 0.01})(Trainer).remote(history=4)
    rollouts = [ray.remote(num_cpus=0.5, resources={SECOND_NODE: 0.01})(Rollout).remote() for _ in range(3)]
    head = ray.get_runtime_context().get_node_id()
    assert all(n != head for n in ray.get([r.node.remote() for r in rollouts]))
    lagger_syncs_at = {3, 6, 19}  # 3 -> snapshot (fresh), 6 -> chain of 3, 19 -> 13 behind > history: snapshot
    publishes, applied = [], {0: [], 1: [], 2: []}
    for version in range(0, 20):
        publishes.append(ray.get(trainer.step_and_publish.remote(version)))
        for i, r in enumerate(rollouts):
            if i == 2 and version not in lagger_syncs_at:
                continue
            update = trainer.update_for.remote(ray.get(r.version.remote()))
            applied[i].append(ray.get(r.apply.remote(update)))
    want = ray.get(trainer.checksum.remote())
    for r in rollouts:
        assert ray.get(r.version.remote()) == 19
        assert ray.get(r.checksums.remote()) == (want, want)
    kinds = [s.kind for s in applied[2]]
    assert kinds == ["snapshot", "chain", "snapshot"]
    assert [s.kind for s in applied[0]] == ["snapshot"] + ["delta"] * 19
    # bytes moved: deltas are much smaller than the dense bf16 weights at this learning rate
    deltas = [p for p in publishes if p.kind == "delta"]
    assert all(p.ratio > 3 for p in deltas)
    moved = sum(s.payload_bytes for s in applied[0] + applied[1] + applied[2])
    dense = publishes[0].dense_bytes
    print(f"moved {moved} bytes for 20+20+3 updates; dense bf16 state {dense} bytes; "
          f"mean delta ratio {sum(p.ratio for p in deltas) / len(deltas):.1f}x")
    assert moved < dense * (3 + 2 * 19 / 3)
    for r in rollouts + [trainer]:
        ray.kill(r)


def _toy_state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(2000, generator=g), "b": torch.randn(16, 8, generator=g)}


@pytest.mark.ray
def test_receiver_rejects_bad_updates_and_keeps_weights(ray_cluster):
    import ray

    pub = WeightPublisher(SyncConfig(level="best", history=2))
    s0 = _toy_state(0)
    pub.publish(s0, 0)
    model_like = {k: v.to(torch.bfloat16).clone() for k, v in s0.items()}
    rec = WeightReceiver(model_like)
    rec.apply(pub.update_for(None))
    s1 = {k: v + 0.01 for k, v in s0.items()}
    pub.publish(s1, 1)
    good = pub.update_for(0)
    before = {k: v.clone() for k, v in model_like.items()}
    checksum = rec.state_checksum()
    # corrupt one bucket of the good update
    part = good.steps[0][0]
    buckets = list(ray.get(part.ref))
    bad_bytes = bytearray(buckets[0])
    bad_bytes[len(bad_bytes) // 2] ^= 0x10
    bad_part = Part(part.keys, ray.put([bytes(bad_bytes)] + buckets[1:]))
    bad = WeightUpdate(good.kind, good.base_version, good.target_version, good.payload_bytes, [[bad_part] + good.steps[0][1:]])
    with pytest.raises(SyncError):
        rec.apply(bad)
    # an update for another base version
    pub.publish({k: v + 0.02 for k, v in s0.items()}, 2)
    with pytest.raises(VersionMismatchError):
        rec.apply(pub.update_for(1))
    assert rec.version == 0 and rec.state_checksum() == checksum
    for k in before:
        assert torch.equal(model_like[k], before[k])
    # and the receiver still accepts the right update afterwards (chain 0 -> 1 -> 2 or snapshot)
    rec.apply(pub.update_for(0))
    assert rec.version == 2 and rec.state_checksum() == pub.state_checksum()


def test_receivers_at_the_same_version_adopt_one_staged_update():
    """One receiver stages and verifies; another at the same version commits the shared staging
    and ends bit-identical; one whose weights differ is refused and keeps them."""
    import pickle

    import torch

    from sync.codec import encode
    from sync.errors import TensorMismatchError, VersionMismatchError
    from sync.receiver import WeightReceiver
    from sync.checksum import state_checksum

    gen = torch.Generator().manual_seed(4)
    v1 = {"w": (torch.randn(300_000, generator=gen) * 0.02).to(torch.bfloat16), "b": torch.zeros(7, dtype=torch.bfloat16)}
    v2 = {k: v.clone() for k, v in v1.items()}
    v2["w"][::97] += 0.001
    v2["b"] += 1
    snapshot = encode(None, v1, base_version=None, target_version=1, level="fast")
    delta = encode(v1, v2, base_version=1, target_version=2, level="fast")
    lead, peer, other = (WeightReceiver({k: torch.zeros_like(v) for k, v in v1.items()}) for _ in range(3))
    staged = lead.stage_buckets([snapshot], kind="snapshot")
    shared_snapshot = pickle.loads(pickle.dumps(lead.share(staged)))  # as it crosses the object store
    lead.commit(staged)
    for r in (peer, other):
        r.commit(r.adopt(shared_snapshot))  # a snapshot applies to any receiver
    for r in (lead, peer, other):
        assert r.version == 1 and r.state_checksum() == state_checksum(v1)
    other.target["w"][5] += 1  # weights that drifted: the shared delta must not apply
    assert peer.rehash() and not other.rehash()
    staged = lead.stage_buckets([delta])
    shared = pickle.loads(pickle.dumps(lead.share(staged)))
    lead.commit(staged)
    peer.commit(peer.adopt(shared))
    assert peer.version == 2 and peer.state_checksum() == state_checksum(v2) == lead.state_checksum()
    assert torch.equal(peer.target["w"].view(torch.int16), v2["w"].view(torch.int16))
    before = other.target["w"].clone()
    with pytest.raises(TensorMismatchError):
        other.adopt(shared)
    assert other.version == 1 and torch.equal(other.target["w"], before)
    with pytest.raises(VersionMismatchError):
        peer.adopt(shared)  # already at 2


def _two_versions(seed: int):
    gen = torch.Generator().manual_seed(seed)
    v1 = {"w": (torch.randn(300_000, generator=gen) * 0.02).to(torch.bfloat16), "b": torch.zeros(7, dtype=torch.bfloat16)}
    v2 = {k: v.clone() for k, v in v1.items()}
    v2["w"][::97] += 0.001
    v2["b"] += 1
    return v1, v2


def test_a_follower_whose_target_was_altered_refuses_the_shared_update_and_takes_only_a_snapshot():
    """A follower's weights written behind its back (its cached digests still say intact): the
    shared delta's base check on cached digests passes, but the follower verifies what it would
    commit on its own bits, so it refuses, writes nothing, drops its version (only a snapshot
    applies) and counts the event; the snapshot restores it bit for bit."""
    import pickle

    from sync.codec import encode
    from sync.errors import CorruptTargetError
    from sync.receiver import WeightReceiver

    v1, v2 = _two_versions(5)
    snapshot = encode(None, v1, base_version=None, target_version=1, level="fast")
    delta = encode(v1, v2, base_version=1, target_version=2, level="fast")
    lead, peer, bad = (WeightReceiver({k: torch.zeros_like(v) for k, v in v1.items()}) for _ in range(3))
    for r in (lead, peer, bad):
        r.commit(r.stage_buckets([snapshot], kind="snapshot"))
    bad.target["w"].view(torch.int16)[123_456] ^= 1  # one bit of an element the delta does not change
    assert bad.state_checksum() == state_checksum(v1)  # the cached digests cannot see it
    assert bad.reread_checksum() != state_checksum(v1)  # a re-read does
    staged = lead.stage_buckets([delta])
    shared = pickle.loads(pickle.dumps(lead.share(staged)))
    lead.commit(staged)
    peer.commit(peer.adopt(shared))
    assert peer.reread_checksum() == state_checksum(v2)
    before = bad.target["w"].clone()
    with pytest.raises(CorruptTargetError, match="changed since they were committed"):
        bad.adopt(shared)
    assert torch.equal(bad.target["w"].view(torch.int16), before.view(torch.int16))  # nothing written
    assert bad.version is None and bad.corrupt_events == 1
    with pytest.raises(VersionMismatchError):
        bad.stage_buckets([delta])  # no delta is built on the altered weights any more
    bad.commit(bad.stage_buckets([encode(None, v2, base_version=None, target_version=2, level="fast")], kind="snapshot"))
    assert bad.version == 2 and bad.reread_checksum() == state_checksum(v2)


def test_a_receiver_whose_target_was_altered_names_it_instead_of_blaming_the_payload():
    """The receiver that fetches and stages: an intact delta fails its range checksums on
    altered committed bits; that is reported as the target's fault (CorruptTargetError, the
    version dropped), not as a corrupt bucket."""
    from sync.codec import encode
    from sync.errors import CorruptTargetError
    from sync.receiver import WeightReceiver

    v1, v2 = _two_versions(6)
    rec = WeightReceiver({k: torch.zeros_like(v) for k, v in v1.items()})
    rec.commit(rec.stage_buckets([encode(None, v1, base_version=None, target_version=1, level="fast")], kind="snapshot"))
    rec.target["w"].view(torch.int16)[7] ^= 4
    delta = encode(v1, v2, base_version=1, target_version=2, level="fast")
    with pytest.raises(CorruptTargetError):
        rec.stage_buckets([delta])
    assert rec.version is None and rec.corrupt_events == 1


@pytest.mark.ray
def test_the_publish_history_pins_about_two_full_sends_at_most(ray_cluster):
    """history=8: full sends in a row keep only the newest (a chain stops at one anyway), and
    deltas whose sum outweighs a full send are dropped (a chain that long is never handed out);
    a receiver left behind still catches up (by snapshot) and lands bit-identical."""
    gen = torch.Generator().manual_seed(9)
    state = {"w": (torch.randn(200_000, generator=gen) * 0.02).to(torch.bfloat16)}
    full = state["w"].numel() * 2
    pub = WeightPublisher(SyncConfig(mode="dense", history=8))
    for v in range(1, 6):
        state["w"][v::50] += 0.01
        pub.publish(state, v)
    assert full <= pub.pinned_bytes() <= 1.01 * full  # one full send, not five
    sparse = WeightPublisher(SyncConfig(mode="sparse", history=8))
    lagging = WeightReceiver({"w": torch.zeros_like(state["w"])})
    for v in range(1, 10):
        state["w"][torch.rand(state["w"].shape, generator=gen) < 0.4] += 0.01  # big deltas
        sparse.publish(state, v)
        if v == 1:
            lagging.apply(sparse.update_for(None))
        assert sparse.pinned_bytes() <= 2.05 * full
    update = sparse.update_for(1)
    assert update.kind in ("snapshot", "chain")
    lagging.apply(update)
    assert lagging.version == 9 and lagging.reread_checksum() == state_checksum(state)
    assert sparse.pinned_bytes() <= 3.1 * full  # and the snapshot made for it, until the next publish


class _CountingReceiver(WeightReceiver):
    """A receiver whose target counts the bytes read from it (every read of a target goes
    through these two methods; a GPU target's reads are transfers back to the host)."""

    read_bytes = 0

    def _read_target(self, key, start, stop):
        out = super()._read_target(key, start, stop)
        self.read_bytes += out.nbytes
        return out

    def _read_target_at(self, key, pos):
        out = super()._read_target_at(key, pos)
        self.read_bytes += out.nbytes
        return out


def test_a_mirrored_receiver_reads_back_only_the_changes_and_a_moving_window():
    """mirror=True (what a GPU target gets by default): a delta reads from the target its changed
    elements (each write checked) and one verify window, not the model, for the lead and a
    follower alike; a receiver without a mirror reads the whole model per delta. A bit flipped
    in the target where no delta writes is found by the moving window within a lap."""
    import pickle

    from sync.codec import encode
    from sync.errors import CorruptTargetError

    gen = torch.Generator().manual_seed(11)
    n, window = 1 << 21, 64 << 10
    model_bytes = (n + 64) * 2

    def step(state):
        nxt = {k: v.clone() for k, v in state.items()}
        nxt["w"][torch.randint(0, n // 2, (n // 200,), generator=gen)] += 0.001  # ~0.5 %, first half only
        return nxt

    v0 = {"w": (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16), "b": torch.zeros(64, dtype=torch.bfloat16)}
    v1 = step(v0)
    lead, follower = (_CountingReceiver({k: torch.zeros_like(v) for k, v in v0.items()}, mirror=True,
                                        verify_bytes_per_commit=window) for _ in range(2))
    plain = _CountingReceiver({k: torch.zeros_like(v) for k, v in v0.items()})
    snapshot = encode(None, v0, base_version=None, target_version=0, level="fast")
    for r in (lead, follower, plain):
        r.commit(r.stage_buckets([snapshot], kind="snapshot"))
        r.read_bytes = 0
    delta = encode(v0, v1, base_version=0, target_version=1, level="fast")
    staged = lead.stage_buckets([delta])
    shared = pickle.loads(pickle.dumps(lead.share(staged)))
    lead.commit(staged)
    follower.commit(follower.adopt(shared))
    plain.commit(plain.stage_buckets([delta]))
    changed = int((v1["w"].view(torch.int16) != v0["w"].view(torch.int16)).sum())
    for r in (lead, follower):
        assert r.read_bytes <= 2 * changed + window + 16  # the changes, one window (rounded to elements)
        assert r.read_bytes < model_bytes / 20
        assert r.reread_checksum() == state_checksum(v1)
    assert plain.read_bytes >= model_bytes  # without a mirror a delta reads the model back
    # the target altered where no delta writes (the second half): caught within one lap
    lead.target["w"].view(torch.int16)[n - 5] ^= 1
    state, version = v1, 1
    with pytest.raises(CorruptTargetError, match="differs from the bits committed"):
        for _ in range(model_bytes // window + 2):
            new = step(state)
            lead.commit(lead.stage_buckets([encode(state, new, base_version=version, target_version=version + 1,
                                                   level="fast")]))
            state, version = new, version + 1
    assert lead.version is None and lead.corrupt_events == 1
    state = step(state)
    lead.commit(lead.stage_buckets([encode(None, state, base_version=None, target_version=version + 2, level="fast")],
                                   kind="snapshot"))
    assert lead.reread_checksum() == state_checksum(state)
