"""The trainer rank of the RL job: a TrainerWorker that also warms up by SFT and publishes weights.

Built by launch/trainer_group.py (`worker_cls=RLTrainerWorker`), then configured once with
`configure_rl(...)` on every rank. Phases, each a constant learning rate:

    sft_step(batch)   supervised warm-up on the task's answers (rl.sft_warmup_steps of them)
    begin_rl()        switch the objective to the RL algorithm (reference policy frozen here),
                      plus the distillation term with distill=squarehead|kl
    rl_step(batch)    one RL optimizer step (TrainerWorker's train_step with the RL objective)
    sync_stage(dense)  plan publishing this rank's slice of the weights (masked) as version =
                       step (+ offset); sync_encode(i) copies part i to bf16 and encodes it,
                       sync_snapshot(i) re-sends a part of the last version (sync/publisher.py);
                       the driver's ShardedPublisher (sync/transport.py) makes these calls and
                       answers receivers

The weight version is the number of optimizer steps taken, so SFT steps count too, plus an
offset that only a restored trainer has (`set_version_floor`): rollout workers may already hold
versions past the checkpoint, and versions never go backwards.
"""
from __future__ import annotations

from dataclasses import replace

from trainer.algos.batch import TrainBatch
from trainer.checkpoint import CheckpointExtra
from trainer.algos.config import AlgoConfig, build_objective
from trainer.algos.distill import with_distillation
from trainer.algos.sft import SFT
from trainer.config import OptimizerConfig
from trainer.distill import DistillConfig
from trainer.worker import TrainerWorker


def constant_lr(cfg: OptimizerConfig, lr: float) -> OptimizerConfig:
    return replace(cfg, lr=lr, min_lr=lr, warmup_steps=0)


class RLTrainerWorker(TrainerWorker):
    def configure_rl(self, algo_cfg: AlgoConfig, sync_cfg, sft_lr: float, rl_lr: float,
                     reset_optimizer: bool = True, rl_warmup_steps: int = 0,
                     distill_cfg: DistillConfig | None = None) -> None:
        """`distill_cfg` (distill=squarehead|kl): the RL loss gains `distill.weight` times a
        distillation term from the frozen dense starting model (trainer/algos/distill.py)."""
        self.algo_cfg = algo_cfg
        self.rl_lr, self.rl_warmup_steps = rl_lr, rl_warmup_steps
        self.rl_start_step: int | None = None
        self.sync_cfg = sync_cfg
        self.sft_opt = constant_lr(self.opt_cfg, sft_lr)
        self.rl_opt = constant_lr(self.opt_cfg, rl_lr)
        self.reset_optimizer = reset_optimizer
        self.algo = with_distillation(build_objective(algo_cfg), distill_cfg, self.model_cfg)
        self.version_offset = 0
        from sync.publisher import SlicePublisher

        self.slice_publisher = SlicePublisher(sync_cfg)

    def sft_step(self, batch: TrainBatch) -> dict[str, float]:
        self.objective, self.opt_cfg = SFT(), self.sft_opt
        return super().train_step(batch.tensors())

    def begin_rl(self, rl_steps_done: int = 0) -> None:
        """Switch to the RL objective. The SFT-phase Adam moments are dropped
        (`rl.reset_optimizer`): they were sized by SFT's far larger gradients. A run resumed from
        an RL checkpoint (`rl_steps_done` > 0) keeps its restored optimizer state. (The KL
        reference of a resumed run is the resumed policy.)"""
        self.objective, self.opt_cfg = self.algo, self.rl_opt
        self.rl_start_step = self.step - rl_steps_done
        if self.sparsifier is not None:
            self.sparsifier.on_rl_start()
        if self.algo_cfg.kl_coef > 0:
            self.algo.set_reference(self.frozen_policy())
        if self.reset_optimizer and rl_steps_done == 0:
            self.optimizer.state.clear()

    def frozen_policy(self):
        """The current policy as a frozen copy (also under ZeRO-3; see trainer/frozen_copy.py). Collective."""
        from models import build_model
        from trainer.frozen_copy import frozen_copy

        masks = None if self.sparsifier is None else {n: layer.mask for n, layer in self.sparsifier.layers.items()}
        return frozen_copy(self.module, lambda: build_model(self.model_cfg)[0], masks)

    def rl_step(self, batch: TrainBatch) -> dict[str, float]:
        """One RL optimizer step on this rank's share; the lr ramps up linearly over the first rl_warmup_steps RL steps
        (a fresh Adam moves every weight by ~lr on its first steps)."""
        if self.rl_start_step is not None and self.rl_warmup_steps:
            k = self.step - self.rl_start_step
            self.opt_cfg = constant_lr(self.rl_opt, self.rl_lr * min(1.0, (k + 1) / self.rl_warmup_steps))
        return super().train_step(batch.tensors())

    def save_checkpoint(self, path: str, extra: CheckpointExtra | None = None) -> None:
        """The TrainerWorker checkpoint plus the algorithm's own state (PPO's value head)."""
        super().save_checkpoint(path, replace(extra or CheckpointExtra(), algo_state=self.algo.state_dict()))

    def load_checkpoint(self, path: str) -> CheckpointExtra:
        extra = super().load_checkpoint(path)
        self.algo.load_state_dict(extra.algo_state)
        return extra

    def set_version_floor(self, min_version: int) -> None:
        """Publish from now on under versions >= `min_version` (a trainer restored from a
        checkpoint, whose step is behind versions that rollout workers already hold)."""
        self.version_offset = max(0, min_version - self.step)

    def version(self) -> int:
        return self.step + self.version_offset

    # -- the rank's side of a sharded publish (sync/transport.py's ActorChannel calls these) --

    def sync_stage(self, dense: bool):
        src = self.published_slice()
        return self.slice_publisher.stage(src.tensors, self.version(), dense, masks=src.masks)

    def sync_encode(self, index: int):
        # the slice is read now: refused when an optimizer step came between stage and encode
        return self.slice_publisher.encode_part(index, self.version())

    def sync_snapshot(self, index: int):
        return self.slice_publisher.snapshot_part(index)
