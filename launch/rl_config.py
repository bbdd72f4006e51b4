"""Typed config of the RL job (`python -m launch.rl`): the pretraining components (model,
sparsity, trainer, optimizer, cluster, logger, distill) plus rollout, task, algo, sync and `rl` itself.
`validate_rl_config` checks everything that can be checked before Ray starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from launch.cluster import ClusterConfig, ClusterResourceError, validate_cluster_config
from launch.config import compose_job_config, to_typed_config
from launch.loggers import LoggerConfig, validate_logger_config
from models import ModelConfig
from models.checks import check_settings
from rollout.config import RolloutConfig, validate_rollout_config
from rollout.tasks import TaskConfig
from sync.config import SyncConfig
from trainer.algos.config import AlgoConfig
from trainer.config import OptimizerConfig, TrainerConfig, validate_trainer_config
from trainer.distill import DistillConfig, DistillConfigError, validate_distill_config
from trainer.sparsity.config import SparsityConfig


@dataclass
class RLConfig:
    mode: str = "sync"  # sync: generate -> train -> publish -> every worker applies | async
    steps: int = 250  # RL optimizer steps (each followed by a publish)
    max_staleness: int = 1  # async: samples at most this many versions older than the trainer
    sft_warmup_steps: int = 120  # supervised steps on the task's answers before RL (0: none)
    sft_lr: float = 3e-4  # constant lr of the warm-up (the RL lr is optimizer.lr, constant)
    reset_optimizer: bool = True  # drop the warm-up's Adam moments when RL starts
    lr_warmup_steps: int = 20  # RL steps over which the lr ramps up to optimizer.lr
    log_every: int = 10
    export: bool = True  # write the final policy (model.safetensors + config.json) into the run dir
    # dtype of that export: "published" (sync.published_dtype: exactly the weights the rollout
    # workers generated with, bit for bit) or "float32" (the trainer's fp32 masters, masked)
    export_dtype: str = "published"
    checkpoint_every: int = 100  # RL steps between trainer checkpoints in <run dir>/checkpoints (0: none)
    # null: start fresh (refused if the run dir holds checkpoints); auto: continue the latest
    # checkpoint of the run dir (fresh when none); a path: that checkpoint. A crashed job resumes so.
    resume: str | None = None
    # trainer group restarts from the latest checkpoint within one job (needs checkpoint_every > 0)
    max_trainer_restarts: int = 2
    eval_every: int = 0  # RL steps between evaluations on the eval prompts (0: none; >0 also evaluates at the end)
    eval_samples: int = 4  # k of pass@k: sampled completions per eval prompt
    pass_threshold: float = 1.0  # a completion passes when its reward is >= this (pass@k)


class RLConfigError(ValueError):
    pass


@dataclass
class RLJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    # auxiliary RL loss: policy loss + distill.weight * SquareHead / KL to the dense starting model
    distill: DistillConfig = field(default_factory=DistillConfig)
    rl: RLConfig = field(default_factory=RLConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="rl_schema", node=RLJobConfig)


def to_rl_config(cfg: DictConfig | RLJobConfig) -> RLJobConfig:
    return to_typed_config(cfg, RLJobConfig)


def compose_rl_config(overrides: list[str] | None = None) -> RLJobConfig:
    register_configs()
    return compose_job_config("rl", overrides)


def rows_per_step(cfg: RLJobConfig) -> int:
    return cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt


def derived_trainer_config(cfg: RLJobConfig) -> TrainerConfig:
    """The trainer settings the RL job implies: one optimizer step per rollout batch, split over
    the data-parallel ranks; max_steps covers warm-up and RL (the sparsity schedule spans both)."""
    from dataclasses import replace

    rows = rows_per_step(cfg)
    world = cfg.cluster.trainers
    return replace(cfg.trainer, max_steps=cfg.rl.sft_warmup_steps + cfg.rl.steps,
                   micro_batch_size=rows // (world * cfg.trainer.grad_accum))


def validate_rl_config(cfg: RLJobConfig) -> None:
    """Every config problem raises here, naming the setting, before any actor starts."""
    import torch

    from models import build_model
    from trainer.algos.config import build_objective
    from trainer.sparsity import module_shapes, validate_sparsity_config

    rl = cfg.rl
    check_settings(RLConfigError, [
        (rl.mode in ("sync", "async"), f"rl.mode={rl.mode!r}: expected sync or async"),
        (rl.max_staleness >= 0, f"rl.max_staleness={rl.max_staleness}: expected >= 0 (versions a sample may lag the trainer)"),
        (rl.steps >= 1, f"rl.steps={rl.steps}: expected >= 1"),
        (rl.sft_warmup_steps >= 0, f"rl.sft_warmup_steps={rl.sft_warmup_steps}: expected >= 0"),
        (rl.checkpoint_every >= 0, f"rl.checkpoint_every={rl.checkpoint_every}: expected >= 0"),
        (rl.resume in (None, "auto") or Path(rl.resume).exists(),
         f"rl.resume={rl.resume!r}: no such checkpoint directory (use null, auto or a path)"),
        (rl.max_trainer_restarts >= 0, f"rl.max_trainer_restarts={rl.max_trainer_restarts}: expected >= 0"),
        (rl.lr_warmup_steps >= 0, f"rl.lr_warmup_steps={rl.lr_warmup_steps}: expected >= 0"),
        (rl.sft_lr > 0, f"rl.sft_lr={rl.sft_lr}: expected > 0"),
        (rl.eval_every >= 0, f"rl.eval_every={rl.eval_every}: expected >= 0"),
        (rl.eval_samples >= 1, f"rl.eval_samples={rl.eval_samples}: expected >= 1 (k of pass@k)"),
        (rl.export_dtype in ("published", "float32"), f"rl.export_dtype={rl.export_dtype!r}: expected published or float32"),
        (cfg.model.sparse_ift == "none", f"model.sparse_ift={cfg.model.sparse_ift!r}: Sparse-IFT transforms a model for "
                                         f"pretraining (launch.pretrain sparse_ift=...); RL fine-tunes the model as it is"),
        (cfg.sync.verify_every >= 0, f"sync.verify_every={cfg.sync.verify_every}: expected >= 0 (0: only at the end)"),
        (cfg.trainer.grad_accum >= 1, f"trainer.grad_accum={cfg.trainer.grad_accum}: expected >= 1"),
    ])
    validate_rollout_config(cfg.rollout)
    if cfg.rollout.engine == "vllm":
        if cfg.model.kind != "hf":
            raise RLConfigError(f"rollout.engine=vllm needs model=hf (vLLM loads Hugging Face checkpoints; "
                                f"model.kind={cfg.model.kind!r} is the built-in GPT): use rollout.engine=torch, or "
                                f"export the GPT as an HF GPT-2 (models/export.py export_gpt_as_hf_directory) and "
                                f"load that with model=hf")
        from rollout.engine import EngineStartError
        from rollout.vllm_engine import check_architecture

        try:
            check_architecture(cfg.model.path)
        except EngineStartError as e:
            raise RLConfigError(str(e)) from None
    build_objective(cfg.algo)
    check_settings(RLConfigError, [(cfg.sync.published_dtype == cfg.rollout.dtype,
                                    f"sync.published_dtype={cfg.sync.published_dtype!r} must equal rollout.dtype="
                                    f"{cfg.rollout.dtype!r}: workers receive weights in place")])
    validate_cluster_config(cfg.cluster)  # cluster.trainers >= 1 before it divides anything
    rows, world = rows_per_step(cfg), cfg.cluster.trainers
    if rows % (world * cfg.trainer.grad_accum):
        raise RLConfigError(f"rollout.prompts_per_step x rollout.samples_per_prompt = {rows} rows do not split "
                            f"over cluster.trainers={world} x trainer.grad_accum={cfg.trainer.grad_accum}")
    validate_logger_config(cfg.logger)
    trainer_cfg = derived_trainer_config(cfg)
    validate_trainer_config(trainer_cfg, cfg.optimizer)
    with torch.device("meta"):
        model, tokenizer = build_model(cfg.model)
    validate_task(cfg, model, tokenizer)
    validate_sparsity_config(cfg.sparsity, module_shapes(model))
    from trainer.sparsity import check_sparsity_for_job  # init=magnitude needs pretrained weights

    check_sparsity_for_job(cfg.sparsity, pretrained=cfg.model.pretrained or rl.resume is not None,
                           peak_lr=cfg.optimizer.lr)
    validate_rl_distill_config(cfg.distill, cfg.model, model)


def validate_rl_distill_config(cfg: DistillConfig, model_cfg, model) -> None:
    """Pretraining's distill checks (trainer/distill.py: a teacher to distil from, hidden states
    for squarehead, weights and temperature in range, a matching teacher_path), plus RL's own:
    there is no task loss to weight, so distill.task_weight must stay 1."""
    validate_distill_config(cfg, model_cfg, model)
    if cfg.name != "none" and cfg.task_weight != 1.0:
        raise DistillConfigError(f"distill.task_weight={cfg.task_weight!r} has no meaning in RL: the loss is "
                                 f"policy loss + distill.weight * distill term; leave it at 1 and set distill.weight")


def validate_task(cfg: RLJobConfig, model, tokenizer) -> None:
    """The prompts (dataset readable, prompt column present, chat messages renderable, short
    enough for the model's context) and the reward functions (loadable, weights matching, a probe
    call on real rows returns one number per row)."""
    import random

    from rollout.batch import prompt_token_ids
    from rollout.rewards import build_reward_fns, probe_reward_fns
    from rollout.tasks import build_task

    task = build_task(cfg.task)  # unknown task, unreadable / empty / malformed dataset
    fns = build_reward_fns(cfg.task.reward_fns, cfg.task.reward_weights)
    train = task.sample(64, random.Random(0))
    if cfg.rl.sft_warmup_steps and any(not isinstance(s.answer, str) for s in train):
        raise RLConfigError("rl.sft_warmup_steps > 0 needs a string 'answer' column on every prompt; "
                            "set rl.sft_warmup_steps=0 or add answers to the dataset")
    every = getattr(task, "samples", train)  # a dataset: all its prompts are checked, not only the first drawn
    samples = every + (task.eval_samples() if cfg.rl.eval_every else [])
    encoded = [(len(prompt_token_ids(s.prompt, tokenizer)), s.prompt) for s in samples]  # ChatTemplateError
    limit = getattr(getattr(model, "config", None), "block_size", None) or \
        getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None:
        longest, prompt = max(encoded, key=lambda x: x[0])
        need = longest + cfg.rollout.max_new_tokens  # prompt (with bos / template) + completion
        if need > limit:
            raise RLConfigError(f"prompt {str(prompt)[:40]!r} + rollout.max_new_tokens={cfg.rollout.max_new_tokens} "
                                f"need {need} positions; the model's context is {limit} (model.block_size)")
        vllm_len = cfg.rollout.vllm.max_model_len if cfg.rollout.engine == "vllm" else None
        if vllm_len is not None and need > vllm_len:
            raise RLConfigError(f"prompt {str(prompt)[:40]!r} + rollout.max_new_tokens={cfg.rollout.max_new_tokens} "
                                f"need {need} positions; rollout.vllm.max_model_len={vllm_len}")
    probe = train[:2]
    names = sorted({k for s in probe for k in s.columns})
    probe_reward_fns(fns, [s.prompt for s in probe], {k: [s.columns.get(k) for s in probe] for k in names},
                     cfg.task.reward_timeout_s or None)


def check_resources(cfg: RLJobConfig, cluster_resources: dict[str, float]) -> None:
    """Trainers and rollout workers together must fit the Ray cluster's totals (checked once
    Ray is up, before any actor starts)."""
    from launch.cluster import trainer_bundle

    need: dict[str, float] = {}
    for k, v in trainer_bundle(cfg.cluster).items():
        need[k] = need.get(k, 0.0) + v * cfg.cluster.trainers
    for k, v in rollout_bundle(cfg.rollout).items():
        need[k] = need.get(k, 0.0) + v * cfg.rollout.workers
    short = {k: v for k, v in need.items() if v > cluster_resources.get(k, 0.0) + 1e-9}
    if short:
        detail = ", ".join(f"{k}: need {v:g}, cluster has {cluster_resources.get(k, 0.0):g}" for k, v in short.items())
        raise ClusterResourceError(
            f"rollout.workers={cfg.rollout.workers} (x rollout.num_cpus={cfg.rollout.num_cpus}) plus "
            f"cluster.trainers={cfg.cluster.trainers} (x cluster.cpus_per_trainer={cfg.cluster.cpus_per_trainer}) "
            f"need more than the Ray cluster has ({detail}); lower rollout.workers or rollout.num_cpus, or add nodes")


def rollout_bundle(cfg: RolloutConfig) -> dict[str, float]:
    bundle = {"CPU": float(cfg.num_cpus)}
    if cfg.num_gpus:
        bundle["GPU"] = float(cfg.num_gpus)
    bundle.update({k: float(v) for k, v in cfg.resources.items()})
    return bundle
