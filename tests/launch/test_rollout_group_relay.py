"""Rollout workers on several nodes: updates relayed node to node (sync/relay.py) through the
rollout group (launch/rl_rollouts.py), and the fetch from the trainer when a relay fails."""
from __future__ import annotations

import pytest

from cluster_nodes import SECOND_NODE

from tiny_policy import published_tiny_policy

pytestmark = pytest.mark.ray


def test_a_second_node_gets_updates_relayed_and_refetches_when_its_relay_fails(ray_cluster, monkeypatch):
    """Workers on two nodes at one version: the second node's update is relayed by the first
    (sync/relay.py), and both commit the trainer's weights; when the relay cannot serve, the
    worker behind it fetches the update from the trainer by itself (counted), nothing hangs."""
    import ray

    import launch.rl_rollouts as rl_rollouts
    from cluster_nodes import HEAD_NODE
    from launch.rl_rollouts import RolloutGroup
    from rollout.config import RolloutConfig
    from rollout.worker import RolloutWorker
    from rollout.tasks import TaskConfig
    from sync.checksum import state_checksum

    mc, state, pub = published_tiny_policy()
    cfg = RolloutConfig(workers=2, num_cpus=0.25, max_restarts=1, resources={HEAD_NODE: 0.01})
    group = RolloutGroup(mc, cfg, TaskConfig(name="reverse", length=3), pub, pub.cfg.apply_timeout_s, relay_fanout=2)
    try:
        assert [s.version for s in group.apply_all()] == [1, 1]
        group._remote = ray.remote(RolloutWorker).options(num_cpus=0.25, resources={SECOND_NODE: 0.01},
                                                          max_concurrency=2, max_restarts=0)
        group.replace(1, "moved to the second node")  # worker 1 restarts there (snapshot)
        nodes = [ray.get(w.node_id.remote()) for w in group.workers]
        assert nodes[0] != nodes[1]
        state["wte.weight"][:2] += 1
        pub.publish(state, 2)
        assert [s.version for s in group.apply_all()] == [2, 2]
        assert group.relayed_nodes == 1 and group.refetches == 0
        assert [c.checksum for c in group.verify_all()] == [state_checksum(state)] * 2

        original = rl_rollouts.relay_update
        monkeypatch.setattr(rl_rollouts, "relay_update", lambda update, node: original(update, "ab" * 28))
        state["wte.weight"][:2] += 1
        pub.publish(state, 3)
        assert [s.version for s in group.apply_all()] == [3, 3]
        assert group.relayed_nodes == 1 and group.refetches == 1
        assert [c.checksum for c in group.verify_all()] == [state_checksum(state)] * 2
    finally:
        group.shutdown()


def test_a_worker_whose_node_resources_are_gone_is_not_replaced_but_named(ray_cluster):
    """A replacement that needs a custom resource no live node offers (its node died) would wait
    forever: the group stops at once with RolloutWorkerLost naming the missing resource."""
    import dataclasses

    from cluster_nodes import HEAD_NODE
    from launch.rl_rollouts import RolloutGroup, RolloutWorkerLost
    from rollout.config import RolloutConfig
    from rollout.tasks import TaskConfig

    mc, state, pub = published_tiny_policy()
    cfg = RolloutConfig(workers=1, num_cpus=0.25, max_restarts=3, resources={HEAD_NODE: 0.01})
    group = RolloutGroup(mc, cfg, TaskConfig(name="reverse", length=3), pub, pub.cfg.apply_timeout_s)
    try:
        group.cfg = dataclasses.replace(cfg, resources={"node_that_died": 1.0})
        with pytest.raises(RolloutWorkerLost, match="node_that_died"):
            group.replace(0, "ActorDiedError")
    finally:
        group.shutdown()
