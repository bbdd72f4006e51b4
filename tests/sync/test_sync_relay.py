"""Relaying updates node to node (sync/relay.py): the relay tree's shape, relayed parts stored on
the relay node and committed bit for bit downstream, and a relay that cannot serve failing the
downstream fetch with a typed error (never a hang, nothing committed)."""
from __future__ import annotations

import sys

import pytest

from cluster_nodes import HEAD_NODE, SECOND_NODE
from sync.relay import relay_parents

# Test modules are not importable on Ray workers: ship this module's classes by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_relay_parents_form_a_chain_a_tree_or_nothing():
    assert relay_parents(4, 0) == [None, None, None, None]
    assert relay_parents(4, 1) == [None, 0, 1, 2]
    assert relay_parents(7, 2) == [None, 0, 0, 1, 1, 2, 2]
    assert relay_parents(1, 2) == [None]
    assert relay_parents(0, 2) == []


# parts of ~1 MB: Ray keeps objects under 100 KB in the owner's memory, not in a node's store
MODEL = dict(n_layer=2, n_embd=128, n_head=2, block_size=32)


def _bf16_state(seed: int) -> dict:
    import torch

    from models import ModelConfig, build_model

    torch.manual_seed(seed)
    model, _ = build_model(ModelConfig(**MODEL))
    return {k: v.detach().to(torch.bfloat16).clone() for k, v in model.named_parameters()}


class Receiver:
    """A weight receiver on some node, committing into its own copy of the model."""

    def __init__(self):
        from sync.receiver import WeightReceiver

        self.receiver = WeightReceiver(_bf16_state(seed=1))

    def apply(self, update):
        return self.receiver.apply(update)

    def reread_checksum(self) -> str:
        return self.receiver.reread_checksum()


@pytest.mark.ray
def test_a_relayed_update_is_served_from_the_relay_node_and_commits_exactly(ray_cluster):
    import ray

    from sync.checksum import state_checksum
    from sync.errors import UpdateUnavailableError
    from sync.payloads import Part, WeightUpdate
    from sync.relay import relay_update
    from sync.config import SyncConfig
    from sync.transport import WeightPublisher

    state = _bf16_state(seed=0)
    pub = WeightPublisher(SyncConfig(mode="sparse"))
    pub.publish(state, 1)
    head = ray.get_runtime_context().get_node_id()
    second = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and SECOND_NODE in n["Resources"])
    update = pub.update_for(None)  # a snapshot: every tensor
    # head -> second -> head: each hop's copies live on the node that served them
    via_second = relay_update(update, second)
    back = relay_update(via_second, head)
    for relayed, node in ((via_second, second), (back, head)):
        refs = [p.ref for step in relayed.steps for p in step]
        assert refs and all(a is not b for a, b in zip(refs, [p.ref for step in update.steps for p in step]))
        ray.wait(refs, num_returns=len(refs), timeout=60)
        locations = ray.experimental.get_object_locations(refs)
        assert all(node in locations[r]["node_ids"] and locations[r]["object_size"] > 200_000 for r in refs)
    # a small part too (a sparse delta's): stored on the relay node, not handed back to the driver
    small = WeightUpdate("delta", 1, 2, 10, [[Part(["x"], ray.put([b"\x01" * 1000]))]])
    small_ref = relay_update(small, second).steps[0][0].ref
    assert ray.get(small_ref, timeout=60) == [b"\x01" * 1000]
    assert second in ray.experimental.get_object_locations([small_ref])[small_ref]["node_ids"]
    receiver = ray.remote(num_cpus=0.25, resources={HEAD_NODE: 0.01})(Receiver).remote()
    try:
        stats = ray.get(receiver.apply.remote(back), timeout=120)
        assert stats.version == 1
        assert ray.get(receiver.reread_checksum.remote()) == state_checksum(state)  # the weights read again
        # a relay node that cannot serve (gone): the fetch fails with a typed error, at once
        nowhere = relay_update(pub.update_for(None), "ab" * 28)
        with pytest.raises(UpdateUnavailableError):
            ray.get(receiver.apply.remote(nowhere), timeout=60)
        assert ray.get(receiver.reread_checksum.remote()) == state_checksum(state)  # nothing committed
    finally:
        ray.kill(receiver)
