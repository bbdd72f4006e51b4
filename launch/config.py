"""Typed job configs for Hydra: each component's dataclass, composed here and registered in the
ConfigStore, so a config is checked when it is loaded (unknown keys, wrong types and unknown group
options are Hydra errors), then `validate_pretrain_config` checks values against each other and
against the model (built on the meta device: no memory, no weights), all before Ray starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from data.config import DataConfig
from launch.cluster import ClusterConfig, validate_cluster_config
from launch.loggers import LoggerConfig, validate_logger_config
from models import ModelConfig
from models.sparse_ift import (
    SPARSE_IFT_METHODS, SparseIFTConfig, SparseIFTConfigError, sparse_module_patterns, validate_sparse_ift,
)
from trainer.config import OptimizerConfig, TrainerConfig, TrainerConfigError, validate_trainer_config
from trainer.distill import DistillConfig
from trainer.sparsity.config import SparsityConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    # Sparse Iso-FLOP transformation of the model (models/sparse_ift.py): `sparse_ift=wide
    # sparse_ift.sparsity=0.75`; its sparse parts are trained by sparsity=rigl|static
    sparse_ift: SparseIFTConfig = field(default_factory=SparseIFTConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # sparse fine-tuning from the dense model
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # null: start fresh (refused if the run dir already holds checkpoints); auto: continue the
    # latest checkpoint in the run dir, or start fresh when there is none; a path: that checkpoint.
    resume: str | None = None
    export: bool = True  # write model.safetensors + config.json into the run dir at the end


def register_configs() -> None:
    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)


def to_typed_config(cfg, schema: type):
    """Hydra's DictConfig of a job as its typed dataclass (`schema`); a dataclass passes through."""
    return cfg if isinstance(cfg, schema) else OmegaConf.to_object(cfg)


def compose_job_config(config_name: str, overrides: list[str] | None = None):
    """The typed config `python -m launch.<job> <overrides>` would run with (tests, notebooks).
    The job's schema must be registered first (its `register_configs`)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name=config_name, overrides=list(overrides or [])))


def to_pretrain_config(cfg: DictConfig | PretrainConfig) -> PretrainConfig:
    return resolve_sparse_ift(to_typed_config(cfg, PretrainConfig))


def compose_pretrain_config(overrides: list[str] | None = None) -> PretrainConfig:
    register_configs()
    return resolve_sparse_ift(compose_job_config("pretrain", overrides))


def resolve_sparse_ift(cfg: PretrainConfig) -> PretrainConfig:
    """The job with its `sparse_ift` group applied: the model is built transformed
    (model.sparse_ift*), and the sparsity method trains exactly its sparse parts at density
    1 - sparse_ift.sparsity, uniform across them (sparsity.density, distribution and include are
    set here, as the reference trains them). Refuses what cannot work: an unknown kind, s outside
    (0, 1), a method other than rigl/static, model=hf without model.from_scratch (a Llama-family
    config.json, checked when the model is built), sparsity.overrides/exclude (the
    transformation decides which layers are sparse). Idempotent."""
    ift = cfg.sparse_ift
    validate_sparse_ift(ift)
    if ift.kind == "none":
        if cfg.model.sparse_ift != "none":
            raise SparseIFTConfigError(
                f"model.sparse_ift={cfg.model.sparse_ift!r} is set from the top-level group; use sparse_ift=<kind>"
            )
        return cfg
    if cfg.model.kind == "hf" and not cfg.model.from_scratch:
        raise SparseIFTConfigError(
            f"sparse_ift={ift.kind} with model=hf needs model.from_scratch=true: Sparse-IFT trains the transformed "
            f"architecture from random init, it does not transform the pretrained weights in model.path"
        )
    if cfg.sparsity.method not in SPARSE_IFT_METHODS:
        raise SparseIFTConfigError(
            f"sparse_ift={ift.kind} trains its sparse parts with sparsity=rigl or sparsity=static (as the "
            f"reference); this job has sparsity.method={cfg.sparsity.method!r}"
        )
    if cfg.sparsity.overrides or cfg.sparsity.exclude:
        raise SparseIFTConfigError(
            f"sparse_ift={ift.kind} decides which layers are sparse (uniformly at 1 - sparse_ift.sparsity); "
            f"remove sparsity.overrides / sparsity.exclude"
        )
    model = replace(cfg.model, sparse_ift=ift.kind, sparse_ift_sparsity=float(ift.sparsity))
    sparsity = replace(cfg.sparsity, density=1.0 - float(ift.sparsity), distribution="uniform",
                       include=sparse_module_patterns(ift.kind, cfg.model.kind))
    return replace(cfg, model=model, sparsity=sparsity)


def validate_pretrain_config(cfg: PretrainConfig) -> dict[str, list[int]]:
    """Check everything that can be checked without data or Ray; return the model's parameter
    shapes (the fingerprint checkpoints are matched against)."""
    import torch

    from models import build_model
    from trainer.checkpoint import ResumeError
    from trainer.sparsity import check_sparsity_for_job, module_shapes, validate_sparsity_config

    validate_trainer_config(cfg.trainer, cfg.optimizer)
    validate_cluster_config(cfg.cluster)
    validate_logger_config(cfg.logger)
    with torch.device("meta"):
        model, _ = build_model(cfg.model)
    limit = getattr(getattr(model, "config", None), "block_size", None) or \
        getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and cfg.trainer.seq_len > limit:
        raise TrainerConfigError(f"trainer.seq_len={cfg.trainer.seq_len} exceeds the model's context of {limit} (model.block_size)")
    if cfg.trainer.device == "cuda" and cfg.cluster.gpus_per_trainer == 0:
        raise TrainerConfigError("trainer.device=cuda needs a GPU per trainer rank: set cluster.gpus_per_trainer=1 "
                                 "(or cluster=local_gpu)")
    validate_sparsity_config(cfg.sparsity, module_shapes(model))
    check_sparsity_for_job(cfg.sparsity, pretrained=cfg.model.pretrained or cfg.resume is not None,
                           peak_lr=cfg.optimizer.lr)
    from trainer.distill import validate_distill_config

    validate_distill_config(cfg.distill, cfg.model, model)
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).exists():
        raise ResumeError(f"resume={cfg.resume!r}: no such checkpoint directory (use null, auto or a step_XXXXXXXX path)")
    return {name: list(p.shape) for name, p in model.named_parameters()}
