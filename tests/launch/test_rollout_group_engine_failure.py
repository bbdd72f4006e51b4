"""A rollout worker whose engine fails to take an update is rebuilt from a snapshot and counted
(launch/rl_rollouts.py), whatever the engine; here the torch engine of the built-in GPT with its
load_weights broken inside the actor."""
from __future__ import annotations

import pytest

from tiny_policy import published_tiny_policy

pytestmark = pytest.mark.ray


def test_a_worker_whose_engine_fails_an_update_is_rebuilt_from_a_snapshot(ray_cluster):
    import ray

    from launch.rl_rollouts import RolloutGroup
    from rollout.config import RolloutConfig
    from rollout.tasks import TaskConfig
    from sync.checksum import state_checksum

    def break_engine(worker) -> None:  # runs inside the actor (pickled by value: a local function)
        def broken(names):
            raise RuntimeError("injected engine reload failure")

        worker.engine.load_weights = broken

    mc, state, pub = published_tiny_policy()
    group = RolloutGroup(mc, RolloutConfig(workers=2, num_cpus=0.25, max_restarts=2), TaskConfig(name="reverse", length=3),
                         pub, pub.cfg.apply_timeout_s)
    try:
        assert [s.version for s in group.apply_all()] == [1, 1]
        ray.get(group.workers[1].__ray_call__.remote(break_engine))
        state["wte.weight"][:4] += 1
        pub.publish(state, 2)
        stats = group.apply_all()
        assert [s.version for s in stats] == [2, 2]
        assert stats[1].kind == "snapshot"  # the rebuilt worker caught up by a full snapshot
        assert group.restarts == 1 and group.engine_failures == 1
        assert [c.checksum for c in group.verify_all()] == [state_checksum(state)] * 2
        assert group.generate_all([2, 2], 2)[1].version == 2
    finally:
        group.shutdown()


def test_a_worker_whose_engine_cannot_start_is_a_named_error_before_training(ray_cluster, tmp_path):
    """An engine that cannot start (a KV cache of 4 KiB) fails the group's construction with the
    engine's own message, naming the key."""
    pytest.importorskip("vllm")
    from hf_fixtures import save_tiny_llama
    from launch.rl_rollouts import RolloutGroup, RolloutStartError
    from models import ModelConfig
    from rollout.config import RolloutConfig, VLLMConfig
    from rollout.tasks import TaskConfig

    path = save_tiny_llama(tmp_path / "llama", with_tokenizer=False, num_attention_heads=2, num_key_value_heads=1)
    cfg = RolloutConfig(engine="vllm", workers=1, prompts_per_step=1, num_cpus=0.25,
                        vllm=VLLMConfig(kv_cache_memory_bytes=4096))
    with pytest.raises(RolloutStartError, match="rollout.vllm.kv_cache_memory_bytes"):
        RolloutGroup(ModelConfig(kind="hf", path=str(path)), cfg, TaskConfig(name="reverse", length=3), None, 60.0)


def test_a_worker_whose_generate_hangs_is_replaced_after_rollout_call_timeout_s(ray_cluster):
    """Every wait on a worker has a bound: a generate that does not answer within
    rollout.call_timeout_s gets its worker replaced (brought to the newest weights by snapshot)
    and the share generated again on the fresh one, instead of hanging the job."""
    import time

    import ray

    from launch.rl_rollouts import RolloutGroup
    from rollout.config import RolloutConfig
    from rollout.tasks import TaskConfig

    def hang_generate(worker) -> None:  # runs inside the actor: its engine's sampling never returns in time
        worker.engine.generate = lambda *args, **kwargs: time.sleep(3600)

    mc, state, pub = published_tiny_policy()
    cfg = RolloutConfig(workers=2, num_cpus=0.25, max_restarts=1, call_timeout_s=5.0)
    group = RolloutGroup(mc, cfg, TaskConfig(name="reverse", length=3), pub, pub.cfg.apply_timeout_s)
    try:
        group.apply_all()
        ray.get(group.workers[1].__ray_call__.remote(hang_generate))
        started = time.monotonic()
        batches = group.generate_all([2, 2], 2)
        assert time.monotonic() - started < 60  # the bound, a restart and one more generate; not the hour
        assert [b.version for b in batches] == [1, 1] and all(b.size == 4 for b in batches)
        assert group.restarts == 1 and group.versions == [1, 1]
    finally:
        group.shutdown()
