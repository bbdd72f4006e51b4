"""The trainer rank of the RL job: a TrainerWorker that also warms up by SFT and publishes weights.

Built by launch/trainer_group.py (`worker_cls=RLTrainerWorker`), then configured once with
`configure_rl(...)` on every rank. Phases, each a constant learning rate:

    sft_step(batch)   supervised warm-up on the task's answers (rl.sft_warmup_steps of them)
    begin_rl()        switch the objective to the RL algorithm (reference policy frozen here)
    train_step(batch) one RL optimizer step (TrainerWorker's step with the RL objective)
    publish()         bf16 weights (masked) -> sync WeightPublisher on rank 0, version = step (+ offset)
    update_for(v)     the WeightUpdate that brings a receiver at version v to the latest one

The weight version is the number of optimizer steps taken, so SFT steps count too, plus an
offset that only a restored trainer has (`set_version_floor`): rollout workers may already hold
versions past the checkpoint, and versions never go backwards.
"""
from __future__ import annotations

import copy
from dataclasses import replace

from trainer.algos.config import AlgoConfig, build_objective
from trainer.algos.sft import SFT
from trainer.config import OptimizerConfig
from trainer.worker import TrainerWorker


def constant_lr(cfg: OptimizerConfig, lr: float) -> OptimizerConfig:
    return replace(cfg, lr=lr, min_lr=lr, warmup_steps=0)


class RLTrainerWorker(TrainerWorker):
    def configure_rl(self, algo_cfg: AlgoConfig, sync_cfg, sft_lr: float, rl_lr: float,
                     reset_optimizer: bool = True, rl_warmup_steps: int = 0) -> None:
        self.algo_cfg = algo_cfg
        self.rl_lr, self.rl_warmup_steps = rl_lr, rl_warmup_steps
        self.rl_start_step: int | None = None
        self.sync_cfg = sync_cfg
        self.sft_opt = constant_lr(self.opt_cfg, sft_lr)
        self.rl_opt = constant_lr(self.opt_cfg, rl_lr)
        self.reset_optimizer = reset_optimizer
        self.algo = build_objective(algo_cfg)
        self.publisher = None
        self.version_offset = 0
        if self.rank == 0:
            from sync.transport import WeightPublisher

            self.publisher = WeightPublisher(sync_cfg)

    def sft_step(self, batch: dict) -> dict[str, float]:
        self.objective, self.opt_cfg = SFT(), self.sft_opt
        return self.train_step(batch)

    def begin_rl(self, rl_steps_done: int = 0) -> None:
        """Switch to the RL objective. The SFT-phase Adam moments are dropped
        (`rl.reset_optimizer`): they were sized by SFT's far larger gradients. A run resumed from
        an RL checkpoint (`rl_steps_done` > 0) keeps its restored optimizer state. (The KL
        reference of a resumed run is the resumed policy.)"""
        self.objective, self.opt_cfg = self.algo, self.rl_opt
        self.rl_start_step = self.step - rl_steps_done
        if self.algo_cfg.kl_coef > 0:
            self.algo.set_reference(copy.deepcopy(self.module))
        if self.reset_optimizer and rl_steps_done == 0:
            self.optimizer.state.clear()

    def train_step(self, batch: dict) -> dict[str, float]:
        """One RL step; the lr ramps up linearly over the first rl_warmup_steps RL steps
        (a fresh Adam moves every weight by ~lr on its first steps)."""
        if self.rl_start_step is not None and self.rl_warmup_steps:
            k = self.step - self.rl_start_step
            self.opt_cfg = constant_lr(self.rl_opt, self.rl_lr * min(1.0, (k + 1) / self.rl_warmup_steps))
        return super().train_step(batch)

    def save_checkpoint(self, path: str, extra: dict | None = None) -> None:
        """The TrainerWorker checkpoint plus the algorithm's own state (PPO's value head)."""
        super().save_checkpoint(path, {**(extra or {}), "algo_state": self.algo.state_dict()})

    def load_checkpoint(self, path: str) -> dict:
        extra = dict(super().load_checkpoint(path))
        self.algo.load_state_dict(extra.pop("algo_state", {}))
        return extra

    def set_version_floor(self, min_version: int) -> None:
        """Publish from now on under versions >= `min_version` (a trainer restored from a
        checkpoint, whose step is behind versions that rollout workers already hold)."""
        self.version_offset = max(0, min_version - self.step)

    def version(self) -> int:
        return self.step + self.version_offset

    def publish(self) -> dict:
        """Publish the current weights as version `self.version()`; rank 0 returns the sync stats
        plus the published state's checksum (collective under ZeRO: call on every rank)."""
        state = self.published_state(self.sync_cfg.published_dtype)
        if self.rank != 0:
            return {}
        from sync.transport import state_checksum

        stats = dict(self.publisher.publish(state, self.version()))
        stats["checksum"] = state_checksum(state)
        stats["density"] = float(sum(int((v != 0).sum()) for v in state.values()) / sum(v.numel() for v in state.values()))
        return stats

    def update_for(self, receiver_version: int | None):
        return self.publisher.update_for(receiver_version)

    def updates_for(self, receiver_versions: list[int | None]) -> dict:
        """{version: update_for(version)} in one call (async offers to workers at any of them)."""
        return {v: self.publisher.update_for(v) for v in receiver_versions}

