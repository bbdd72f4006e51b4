"""The trainer side of the RL job: the TrainerGroup of RLTrainerWorker ranks, and its restart.

Mirrors launch/rl_rollouts.py. A trainer rank that dies (RayActorError from a trainer call) ends
the group: the driver calls `restart`, which tears the group down and builds a fresh, configured
one; the driver then loads the latest checkpoint into it (launch/rl.py). `restarts` counts
restarts and more than `rl.max_trainer_restarts` of them stop the job with TrainerLost.
"""
from __future__ import annotations

import logging

from launch.trainer_group import TrainerGroup
from sync.transport import PublishStats
from trainer.algos.rl_worker import RLTrainerWorker

log = logging.getLogger(__name__)


class TrainerLost(RuntimeError):
    """A trainer rank died and the job cannot (or may no longer) restart the trainer group."""


class RLTrainers:
    def __init__(self, cfg, trainer_cfg, algo_cfg):
        """`cfg` is the RLJobConfig; `trainer_cfg` and `algo_cfg` the derived ones the job uses."""
        self.cfg, self.trainer_cfg, self.algo_cfg = cfg, trainer_cfg, algo_cfg
        self.restarts = 0
        self.group = self._start()
        self.publisher = self._publisher()

    def _publisher(self):
        """The driver's side of weight sync over this group's ranks (sync/transport.py); the
        sparse/dense choice keeps what it has measured across trainer restarts."""
        from sync.transport import ActorChannel, ShardedPublisher

        publisher = ShardedPublisher([ActorChannel(w) for w in self.group.workers], self.cfg.sync)
        if getattr(self, "publisher", None) is not None:
            publisher.chooser = self.publisher.chooser
        return publisher

    def _start(self) -> TrainerGroup:
        cfg, rl = self.cfg, self.cfg.rl
        group = TrainerGroup(cfg.cluster, cfg.model, self.trainer_cfg, cfg.optimizer, cfg.sparsity,
                             worker_cls=RLTrainerWorker)
        try:
            group.call("configure_rl", self.algo_cfg, cfg.sync, rl.sft_lr, cfg.optimizer.lr, rl.reset_optimizer,
                       rl.lr_warmup_steps, cfg.distill)
        except BaseException:
            group.shutdown()
            raise
        return group

    @property
    def workers(self) -> list:
        return self.group.workers

    def alive(self, timeout_s: float = 30.0) -> bool:
        """Whether every rank still answers (tells a trainer death from a rollout worker's)."""
        import ray

        for w in self.group.workers:  # one by one: a rank stuck in a collective with a dead peer times out
            try:
                ray.get(w.get_step.remote(), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return False
        return True

    def restart(self, reason: str, checkpoint) -> None:
        """Replace the whole group (ranks form one process group: one death ends them all).
        `checkpoint` is what the new group will load; None means there is nothing to restore."""
        self.restarts += 1
        limit = self.cfg.rl.max_trainer_restarts
        if self.restarts > limit:
            raise TrainerLost(f"a trainer rank died ({reason}); {self.restarts} restarts exceed "
                              f"rl.max_trainer_restarts={limit}")
        if checkpoint is None:
            raise TrainerLost(f"a trainer rank died ({reason}) and there is no checkpoint to restart from; "
                              "set rl.checkpoint_every > 0")
        log.warning("a trainer rank died (%s); restarting the trainer group from %s (restart %d)",
                    reason, checkpoint, self.restarts)
        self.group.shutdown()
        self.group = self._start()
        self.publisher = self._publisher()

    def sft_step(self, batch: dict) -> dict[str, float]:
        """One supervised warm-up step, `batch` split over the ranks; merged metrics."""
        from launch.trainer_group import merge_metrics

        return merge_metrics(self.group.call_per_rank("sft_step", shard(batch, self.group.world_size)))

    def train_step(self, batch: dict) -> dict[str, float]:
        """One RL optimizer step, `batch` split over the ranks; merged metrics."""
        return self.group.train_step(shard(batch, self.group.world_size))

    def publish(self) -> PublishStats:
        """Publish the current weights: every rank encodes its own slice; its stats. Receivers
        fetch with `publisher.update_for(version)`."""
        return self.publisher.publish()

    def begin_publish(self):
        """Stage a publish on every rank and return at once, parts still encoding: receivers
        brought up to date now overlap their fetch and decode with the encode."""
        return self.publisher.begin()

    def finish_publish(self, handle, sync_s: float | None = None) -> PublishStats:
        """Wait for `handle`'s encode to end; its stats. `sync_s` (begin to the last receiver's
        commit) feeds the sparse/dense choice of later publishes."""
        stats = self.publisher.finish(handle)
        if sync_s is not None:
            self.publisher.observe(handle, sync_s)
        return stats

    def shutdown(self) -> None:
        self.group.shutdown()


def shard(batch: dict, world: int) -> list[dict]:
    """Split every tensor of `batch` into `world` equal row blocks, one per rank, in order.
    ValueError when the rows do not divide evenly (launch/rl_config.py makes them divide)."""
    total = next(iter(batch.values())).shape[0]
    if total % world:
        raise ValueError(f"a batch of {total} rows does not split into {world} equal rank shares")
    rows = total // world
    return [{k: v[r * rows:(r + 1) * rows] for k, v in batch.items()} for r in range(world)]
