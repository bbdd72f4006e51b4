"""The trainer side of the RL job: the TrainerGroup of RLTrainerWorker ranks, and its restart.

Mirrors launch/rl_rollouts.py. A trainer rank that dies (RayActorError from a trainer call) ends
the group: the driver calls `restart`, which tears the group down and builds a fresh, configured
one; the driver then loads the latest checkpoint into it (launch/rl.py). `restarts` counts
restarts and more than `rl.max_trainer_restarts` of them stop the job with TrainerLost.
"""
from __future__ import annotations

import logging
from pathlib import Path

from launch.trainer_group import TrainerGroup
from sync.transport import ActorChannel
from trainer.algos.batch import TrainBatch
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

    def channels(self) -> list[ActorChannel]:
        """The ranks as the driver's publisher (sync/transport.py ShardedPublisher) reaches them."""
        return [ActorChannel(w) for w in self.group.workers]

    def alive(self, timeout_s: float = 30.0) -> bool:
        """Whether every rank still answers (tells a trainer death from a rollout worker's)."""
        import ray

        for w in self.group.workers:  # one by one: a rank stuck in a collective with a dead peer times out
            try:
                ray.get(w.get_step.remote(), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return False
        return True

    def restart(self, reason: str, checkpoint: Path | None) -> Path:
        """Replace the whole group (ranks form one process group: one death ends them all).
        `checkpoint` is what the new group will load (returned); None means there is nothing to
        restore: TrainerLost."""
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
        return checkpoint

    def sft_step(self, batch: TrainBatch) -> dict[str, float]:
        """One supervised warm-up step, `batch` split over the ranks; merged metrics."""
        from launch.trainer_group import merge_metrics

        return merge_metrics(self.group.call_per_rank("sft_step", batch.shard(self.group.world_size)))

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One RL optimizer step, `batch` split over the ranks; merged metrics."""
        return self.group.train_step(batch.shard(self.group.world_size), method="rl_step")

    def shutdown(self) -> None:
        self.group.shutdown()
