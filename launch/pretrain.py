"""Sparse pretraining job: `python -m launch.pretrain [hydra overrides]` (`-m` for sweeps).

The driver, top to bottom: check the config (before anything starts), load the data, find the
checkpoint to resume, start or join Ray and reserve the trainers, then loop: batch -> trainer
group step -> log; eval, checkpoint every k steps; at the end a final eval, checkpoint, export
and summary.json. `run_pretrain(cfg, run_dir)` is the whole job, callable in-process with a Ray
that is already running (the multi-node test does this).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # Ctrl-C during the imports below (torch, Ray: seconds) exits quietly
    import os
    import signal

    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

from launch.env import set_runtime_defaults  # noqa: E402

set_runtime_defaults()

import hydra  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from launch.config import PretrainConfig, register_configs, to_pretrain_config, validate_pretrain_config  # noqa: E402
from trainer.checkpoint import ResumeError  # noqa: E402,F401  (raised by plan_run; importable from here)


@dataclass
class RunPlan:
    """Everything settled before Ray starts: checked config, data, where to resume."""
    cfg: PretrainConfig
    run_dir: Path
    sampler: Any  # data.WindowSampler over the training stream
    eval_batches: list[list[dict]]  # per rank
    data_description: str
    fingerprint: dict  # what a checkpoint must match to be resumed by this run
    resume_from: Path | None
    start_step: int

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"


def run_pretrain(cfg: PretrainConfig, run_dir: str | Path) -> dict:
    """Run the job; returns the summary (also written to run_dir/summary.json)."""
    from launch.cluster import ray_cluster
    from launch.loggers import MetricsLogger
    from launch.trainer_group import TrainerGroup

    started = time.time()
    plan = plan_run(cfg, Path(run_dir).resolve())
    logger = MetricsLogger(cfg.logger, plan.run_dir, config=asdict(cfg), total_steps=cfg.trainer.max_steps,
                           start_step=plan.start_step)
    try:
        with ray_cluster(cfg.cluster):
            from trainer.distill import build_objective

            group = TrainerGroup(cfg.cluster, cfg.model, cfg.trainer, cfg.optimizer, cfg.sparsity,
                                 objective=build_objective(cfg.distill, cfg.model))
            try:
                state = restore(group, plan)
                train(group, plan, state, logger)
                summary = finish(group, plan, state, logger, time.time() - started)
            finally:
                group.shutdown()
    finally:
        logger.close()
    return summary


def plan_run(cfg: PretrainConfig, run_dir: Path) -> RunPlan:
    """Check config, load data, pick and check the checkpoint to resume: every bad input fails here."""
    import torch

    from data import WindowSampler, eval_windows, load_corpus
    from models import build_model
    from trainer import checkpoint as ckpt

    param_shapes = validate_pretrain_config(cfg)
    tc, world = cfg.trainer, cfg.cluster.trainers
    with torch.device("meta"):
        _, tokenizer = build_model(cfg.model)
    corpus = load_corpus(cfg.data, tokenizer)
    window = tc.seq_len + 1
    sampler = WindowSampler(corpus.train, window, tc.seed if cfg.data.seed is None else cfg.data.seed)
    eval_sets = eval_windows(corpus.eval, window, tc.eval_batches * world, tc.micro_batch_size)
    fingerprint = {"world_size": world, "zero_stage": tc.zero_stage, "precision": tc.precision,
                   "sparsity_method": cfg.sparsity.method, "param_shapes": param_shapes,
                   "seq_len": tc.seq_len, "max_steps": tc.max_steps}
    if cfg.sparse_ift.kind != "none":  # a different transformation is refused (shapes alone may agree)
        fingerprint["sparse_ift"] = {"kind": cfg.sparse_ift.kind, "sparsity": float(cfg.sparse_ift.sparsity)}
    resume_from = ckpt.find_resume_checkpoint(cfg.resume, run_dir / "checkpoints")
    start_step = 0 if resume_from is None else ckpt.validate_checkpoint(resume_from, fingerprint)["step"]
    return RunPlan(cfg, run_dir, sampler, [[{"tokens": b} for b in eval_sets[r::world]] for r in range(world)],
                   corpus.description, fingerprint, resume_from, start_step)


def restore(group, plan: RunPlan) -> dict:
    """The driver's state: fresh, or from the checkpoint (weights, optimizer, sparsity, RNG go to
    the ranks; the data position and the driver's own counters come back here)."""
    if plan.resume_from is None:
        return {"step": 0, "first_eval_loss": None, "last_eval_loss": None, "train_loss_final": None,
                "tokens_per_s": [], "sparsity": {}}
    extra = group.load_checkpoint(str(plan.resume_from))
    plan.sampler.load_state_dict(extra.data)
    return extra.driver


def train(group, plan: RunPlan, state: dict, logger) -> None:
    """The loop: batch -> step on every rank -> log; eval and checkpoint on their schedules."""
    tc, world = plan.cfg.trainer, plan.cfg.cluster.trainers
    if state["first_eval_loss"] is None:
        state["first_eval_loss"] = evaluate(group, plan, state, logger)
    logger.start_progress(state["step"])
    while state["step"] < tc.max_steps:
        batch = plan.sampler.next_batch(tc.micro_batch_size * tc.grad_accum * world)
        metrics = group.train_step([{"tokens": shard} for shard in np.split(batch, world)])
        step = state["step"] = state["step"] + 1
        state["train_loss_final"] = metrics["loss"]
        if "tokens_per_s" in metrics:  # objectives without a token count (RL) have none
            state["tokens_per_s"].append(metrics["tokens_per_s"])
        state["sparsity"] = {k: v for k, v in metrics.items() if k.startswith("sparsity/") and k.count("/") == 1}
        state["layer_densities"] = {k[len(LAYER_DENSITY):]: v for k, v in metrics.items() if k.startswith(LAYER_DENSITY)}
        last = step == tc.max_steps
        if step % tc.log_every == 0 or last:
            logger.log(train_log(metrics), step)
        if (tc.eval_every and step % tc.eval_every == 0) or last:
            evaluate(group, plan, state, logger)
        if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or last:
            save_checkpoint(group, plan, state)


def evaluate(group, plan: RunPlan, state: dict, logger) -> float:
    loss = group.evaluate(plan.eval_batches)["loss"]
    state["last_eval_loss"] = loss
    logger.log({"eval/loss": loss}, state["step"])
    return loss


def finish(group, plan: RunPlan, state: dict, logger, wall_s: float) -> dict:
    """Export the masked weights and write summary.json."""
    from trainer import checkpoint as ckpt

    if plan.cfg.export:
        group.export(str(plan.run_dir))
    rates = state["tokens_per_s"]
    summary = {
        "steps": state["step"], "world_size": group.world_size, "sparsity_method": plan.cfg.sparsity.method,
        "distill": plan.cfg.distill.name,
        "trainer_nodes": [i.node_id for i in group.info], "device": group.info[0].device,
        "eval/loss_first": state["first_eval_loss"], "eval/loss_final": state["last_eval_loss"],
        "train/loss_final": state["train_loss_final"],
        "tokens_per_s_mean": sum(rates) / len(rates) if rates else None,
        "resumed_from": str(plan.resume_from) if plan.resume_from else None,
        "checkpoint": str(ckpt.latest_checkpoint(plan.checkpoint_root)),
        "export": str(plan.run_dir / "model.safetensors") if plan.cfg.export else None,
        "wall_s": wall_s, "data": plan.data_description, **state["sparsity"],
        **model_cost(plan.cfg, state.get("layer_densities") or {}),
    }
    logger.summary(summary)
    from launch.curves import PRETRAIN_PANELS

    logger.plot(PRETRAIN_PANELS)
    return summary


LAYER_DENSITY = "sparsity/density/"  # per-layer metric prefix: sparsity/density/<parameter name>


def model_cost(cfg: PretrainConfig, layer_densities: dict[str, float]) -> dict:
    """model.flops_per_token (every matmul a token costs, block linears at their final nonzero
    fraction; models/flops.py) and model.params_total, from the model built on the meta device."""
    import torch

    from models import build_model
    from models.flops import flops_per_token, params_total

    with torch.device("meta"):
        model, _ = build_model(cfg.model)
    return {"model.flops_per_token": flops_per_token(model, cfg.trainer.seq_len, layer_densities),
            "model.params_total": params_total(model), "sparse_ift": cfg.sparse_ift.kind,
            "sparse_ift.sparsity": cfg.sparse_ift.sparsity if cfg.sparse_ift.kind != "none" else None}


def train_log(metrics: dict) -> dict:
    """Rename a trainer group's step metrics for the loggers (train/loss, lr, tokens_per_s...)."""
    out = {}
    for k, v in metrics.items():
        if k == "loss":
            out["train/loss"] = v
        elif k.startswith("sum/") or k == "step":
            continue
        else:
            out[k] = v
    return out


def save_checkpoint(group, plan: RunPlan, state: dict) -> Path:
    """All ranks write into a staging dir; then the manifest and an atomic rename commit it."""
    from trainer import checkpoint as ckpt

    return ckpt.save_checkpoint(group, plan.checkpoint_root, state["step"], plan.fingerprint,
                                ckpt.CheckpointExtra(driver=dict(state), data=plan.sampler.state_dict()),
                                keep=plan.cfg.trainer.keep_checkpoints)


register_configs()


def _job_spec():
    from launch.cli import JobSpec
    from launch.console import pretrain_summary

    return JobSpec("pretrain", PretrainConfig, register_configs,
                   lambda cfg, run_dir: run_pretrain(to_pretrain_config(cfg), run_dir), "resume", pretrain_summary)


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig) -> dict | None:
    from launch.cli import run_job

    return run_job(_job_spec(), cfg)


if __name__ == "__main__":
    from launch.cli import main as cli_main

    cli_main(_job_spec(), main)
