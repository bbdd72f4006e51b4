"""A rollout worker whose committed weights were altered behind its receiver's back (its cached
digests still say intact) is caught when it verifies the update the node's lead staged for it,
and resynced by a snapshot (launch/rl_rollouts.py); the other workers are untouched."""
from __future__ import annotations

import pytest
import torch

from cluster_nodes import SECOND_NODE

from tiny_policy import published_tiny_policy

pytestmark = pytest.mark.ray


def test_a_follower_with_an_altered_target_is_caught_and_resynced_by_snapshot(ray_cluster):
    import ray

    from launch.rl_rollouts import RolloutGroup
    from rollout.config import RolloutConfig
    from rollout.tasks import TaskConfig
    from sync.checksum import state_checksum

    def alter(worker) -> None:  # runs inside the actor: one bit of a tensor the next delta leaves alone
        with torch.no_grad():
            worker.slot.receiver.target["h.0.mlp.c_fc.weight"].data.view(-1).view(torch.int16)[3] ^= 1

    mc, state, pub = published_tiny_policy()
    # three workers on one node: the first stages each update, the other two adopt its staging
    cfg = RolloutConfig(workers=3, num_cpus=0.25, max_restarts=0, resources={SECOND_NODE: 0.01})
    group = RolloutGroup(mc, cfg, TaskConfig(name="reverse", length=3), pub, pub.cfg.apply_timeout_s)
    try:
        assert [s.version for s in group.apply_all()] == [1, 1, 1]
        ray.get(group.workers[2].__ray_call__.remote(alter))
        assert ray.get(group.workers[2].state_checksum.remote()) == state_checksum(state)  # cached: blind
        assert group.verify_all()[2].checksum != state_checksum(state)  # re-read: not
        state["wte.weight"][:2] += 1
        pub.publish(state, 2)
        stats = group.apply_all()
        assert [s.version for s in stats] == [2, 2, 2]
        assert stats[1].shared and stats[2].kind == "snapshot"
        assert group.corrupt_resyncs == 1 and group.restarts == 0
        assert [c.checksum for c in group.verify_all()] == [state_checksum(state)] * 3
    finally:
        group.shutdown()


@pytest.mark.slow
def test_a_shared_staging_that_never_arrives_does_not_hang_the_group(ray_cluster):
    """The node's lead stalls in staging (as behind a link that stopped): the driver waits at
    most sync.apply_timeout_s for each worker, the followers then fetch the update themselves,
    and the stuck lead is replaced by snapshot; every worker ends at the new version with the
    trainer's weights re-read."""
    import time

    import ray

    from launch.rl_rollouts import RolloutGroup
    from rollout.config import RolloutConfig
    from rollout.tasks import TaskConfig
    from sync.config import SyncConfig
    from sync.checksum import state_checksum

    def stall_staging(worker) -> None:  # runs inside the actor: its next fetch stalls for 60 s
        original = worker.slot.receiver.fetch

        def slow(update):
            time.sleep(60)
            return original(update)

        worker.slot.receiver.fetch = slow

    mc, state, pub = published_tiny_policy(sync_cfg=SyncConfig(mode="sparse", apply_timeout_s=4.0))
    cfg = RolloutConfig(workers=3, num_cpus=0.25, max_restarts=1, resources={SECOND_NODE: 0.01})
    group = RolloutGroup(mc, cfg, TaskConfig(name="reverse", length=3), pub, pub.cfg.apply_timeout_s)
    try:
        assert [s.version for s in group.apply_all()] == [1, 1, 1]
        ray.get(group.workers[0].__ray_call__.remote(stall_staging))
        state["wte.weight"][:2] += 1
        pub.publish(state, 2)
        stats = group.apply_all()  # returns (it does not wait out the 60 s): the lead was replaced
        assert [s.version for s in stats] == [2, 2, 2]
        assert group.restarts == 1 and stats[0].kind == "snapshot"
        assert [c.checksum for c in group.verify_all()] == [state_checksum(state)] * 3
    finally:
        group.shutdown()
