"""One data-parallel trainer rank: model, sparsifier, DeepSpeed engine, step, eval, checkpoint.

A plain class: launch/trainer_group.py wraps it with `ray.remote` (one actor per rank), and unit
tests use it directly (world_size 1). Call order: `TrainerWorker(...)`, `setup(master_addr,
master_port)` on every rank at once (it joins the process group), then the coarse methods. Under
ZeRO, `published_state`, `export`, `save_checkpoint` and `load_checkpoint` are collective: call
them on every rank.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from models import ModelConfig, build_model
from trainer.checkpoint import (CheckpointError, CheckpointExtra, deepspeed_safe_globals, files_for_rank, load_rank_state, rank_file,
                                read_manifest, rng_state, save_rank_state, set_rng_state, verify_files,
                                weights_only_torch_load)
from trainer.config import OptimizerConfig, TrainerConfig
from trainer.distributed import (destroy_distributed, unlink_shm_buffer, free_port, node_id, node_ip, resolve_device,
                                 set_distributed_env)
from trainer.lr_schedule import lr_at
from trainer.objectives import LanguageModelingObjective, Objective
from trainer.param_access import PublishedSlice

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from trainer.sparsity import Sparsifier

DS_TAG = "ds"  # DeepSpeed's sub-directory inside one checkpoint directory


@dataclass
class RankInfo:
    """What a rank reports once set up (TrainerWorker.setup)."""
    rank: int
    device: str
    node_ip: str
    node_id: str | None  # None outside Ray (a worker used directly)
    parameters: int  # the model's parameter count (every rank builds the whole model)


class TrainerWorker:
    def __init__(self, model_cfg: ModelConfig, trainer_cfg: TrainerConfig, optimizer_cfg: OptimizerConfig,
                 sparsity_cfg=None, objective: Objective | None = None, rank: int = 0, world_size: int = 1):
        self.model_cfg = model_cfg
        self.cfg = trainer_cfg
        self.opt_cfg = optimizer_cfg
        self.sparsity_cfg = sparsity_cfg
        self.objective = objective or LanguageModelingObjective()
        self.rank = rank
        self.world_size = world_size
        self.step = 0  # optimizer steps taken
        self._engine: DeepSpeedEngine | None = None
        self.sparsifier: Sparsifier | None = None

    @property
    def engine(self) -> DeepSpeedEngine:
        """The DeepSpeed engine wrapping the model; exists once `setup` has run."""
        if self._engine is None:
            raise RuntimeError(f"trainer rank {self.rank}: setup() has not run, there is no DeepSpeed engine yet")
        return self._engine

    # -- setup -------------------------------------------------------------------------------

    def rendezvous_address(self) -> tuple[str, int]:
        """(this node's IP, a free port): rank 0's answer becomes MASTER_ADDR/PORT for all."""
        return node_ip(), free_port()

    def setup(self, master_addr: str, master_port: int) -> RankInfo:
        """Join the process group and build model, sparsifier, optimizer and DeepSpeed engine."""
        from trainer.runtime_env import set_runtime_defaults

        set_runtime_defaults()
        self.device = resolve_device(self.cfg.device)
        set_distributed_env(self.rank, self.world_size, master_addr, master_port, self.device)
        torch.set_num_threads(self.cfg.num_threads)
        import warnings

        # DeepSpeed's ZeRO calls a torch.distributed function torch marks as deprecated, every step.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device == "cuda" else "gloo")
        # Same seed on every rank: identical initial weights (DeepSpeed also broadcasts rank 0's).
        _seed_everything(self.cfg.seed)
        if self.rank != 0:  # one "Loading weights" bar per job (rank 0's), not one per rank
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        model, self.tokenizer = build_model(self.model_cfg)
        if self.sparsity_cfg is not None:  # dense too: its sparsifier reports density 1
            from trainer.sparsity import build_sparsifier

            # pretrained: an HF model's loaded weights rank the starting masks (sparsity.init=auto)
            self.sparsifier = build_sparsifier(model, self.sparsity_cfg, self.cfg.max_steps,
                                               pretrained=self.model_cfg.pretrained)
            self.sparsifier.attach()
        self.optimizer = torch.optim.AdamW(  # a torch optimizer: DeepSpeed's fused ones JIT-compile on CPU
            _param_groups(model, self.opt_cfg.weight_decay), lr=lr_at(0, self.opt_cfg, self.cfg.max_steps),
            betas=(self.opt_cfg.betas[0], self.opt_cfg.betas[1]), eps=self.opt_cfg.eps,  # two: trainer/config.py
        )
        self._engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self._ds_config())
        if self.device == "cpu":
            import torch.distributed as dist

            dist.barrier()  # every rank has mapped every rank's shm buffer by now
            unlink_shm_buffer(self.rank)
        self.module = self.engine.module
        from trainer.param_access import DeepSpeedParamAccess

        self.param_access = DeepSpeedParamAccess(self.module, self.optimizer)
        _seed_everything(self.cfg.seed + 1000 * (self.rank + 1))  # per-rank stream (dropout, sampling)
        return RankInfo(self.rank, self.device, node_ip(), node_id(), sum(p.numel() for p in self.module.parameters()))

    def _ds_config(self) -> dict:
        c = self.cfg
        return {
            "train_micro_batch_size_per_gpu": c.micro_batch_size,
            "gradient_accumulation_steps": c.grad_accum,
            "train_batch_size": c.micro_batch_size * c.grad_accum * self.world_size,
            "gradient_clipping": c.grad_clip,
            "zero_optimization": {"stage": c.zero_stage},
            "bf16": {"enabled": c.precision == "bf16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    # -- training ----------------------------------------------------------------------------

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro batches of this rank's share of the batch."""
        started = time.perf_counter()
        lr = lr_at(self.step, self.opt_cfg, self.cfg.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.train()
        sums = _MetricSums()
        micro_batches = self._micro_batches(batch)
        if self.sparsifier is not None:  # decoupled SR-STE decays by lr_t; coupled divides by micro-batches
            self.sparsifier.set_step_context(lr=lr, peak_lr=self.opt_cfg.lr, micro_batches=len(micro_batches))
        for micro in micro_batches:
            if self.sparsifier is not None:
                self.sparsifier.before_forward(self.step)
            loss, metrics = self.objective(self.engine, micro)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            sums.add(metrics)
        if self.sparsifier is not None:
            self.sparsifier.after_optimizer_step(self.step, self.param_access)
        self.step += 1
        metrics = sums.result()
        seconds = time.perf_counter() - started
        metrics.update({"lr": lr, "step": self.step, "step_s": seconds})
        if "sum/tokens" in metrics:
            metrics["tokens_per_s"] = metrics["sum/tokens"] / seconds
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics.update(self.sparsity_metrics())
        return metrics

    def sparsity_metrics(self) -> dict[str, float]:
        if self.sparsifier is None:
            return {}
        return {k if k.startswith("sparsity/") else f"sparsity/{k}": float(v) for k, v in self.sparsifier.metrics().items()}

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> dict[str, float]:
        """Mean objective metrics over `batches` (no gradient, eval mode)."""
        self.engine.eval()
        sums = _MetricSums()
        for batch in batches:
            _, metrics = self.objective(self.engine, self._to_device(batch))
            sums.add(metrics)
        self.engine.train()
        return sums.result()

    def _to_device(self, batch: dict) -> dict[str, torch.Tensor]:
        return {k: (v if torch.is_tensor(v) else torch.from_numpy(np.array(v))).to(self.device) for k, v in batch.items()}

    def _micro_batches(self, batch: dict) -> list[dict[str, torch.Tensor]]:
        batch = self._to_device(batch)
        size = next(iter(batch.values())).shape[0]
        if size != self.cfg.micro_batch_size * self.cfg.grad_accum:
            raise ValueError(f"rank {self.rank} got a batch of {size} rows; expected trainer.micro_batch_size "
                             f"x trainer.grad_accum = {self.cfg.micro_batch_size * self.cfg.grad_accum}")
        m = self.cfg.micro_batch_size
        return [{k: v[i:i + m] for k, v in batch.items()} for i in range(0, size, m)]

    # -- weights out -------------------------------------------------------------------------

    def published_state(self, dtype: str = "bfloat16") -> dict[str, torch.Tensor]:
        """Full weights by `named_parameters` name (tied weights once), from the fp32 masters,
        masked by the sparsifier (pruned entries exactly 0), cast to `dtype`, on CPU. Collective
        under ZeRO; only rank 0 returns the tensors (others return {})."""
        state = {name: self.param_access.get(name).detach().to("cpu", torch.float32).clone()
                 for name in self.param_access.names()}
        if self.sparsifier is not None:
            state = self.sparsifier.masked_state_dict(state)
        if self.rank != 0:
            return {}
        return {k: v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()}

    def published_slice(self) -> PublishedSlice:
        """This rank's share of the published weights, views with the sparsifier's masks of the
        same ranges (trainer/param_access.py DeepSpeedParamAccess.published_slice). Local."""
        masks = {} if self.sparsifier is None else {name: layer.mask for name, layer in self.sparsifier.layers.items()}
        return self.param_access.published_slice(masks, self.rank, self.world_size)

    def export(self, path: str, dtype: str = "float32") -> str | None:
        """Write the final weights (the fp32 masters, masked, cast to `dtype`: "float32" keeps
        them whole, the published dtype gives exactly what rollout workers ran) into `path` with
        models/export.py: the built-in GPT as model.safetensors + config.json, an HF model as a
        save_pretrained directory (tokenizer files copied; under sparse_ift=parallel|factorized|doped
        export_sparse_ift_hf_directory's layout); `sparsity.json` beside them when sparse. Collective;
        rank 0 writes and returns the directory."""
        from models.export import (
            HF_TRANSFORMED_KINDS, export_gpt_directory, export_hf_directory, export_sparse_ift_hf_directory,
        )

        state = self.published_state(dtype=dtype)
        if self.rank != 0:
            return None
        info = meta = None
        if self.sparsifier is not None and self.sparsifier.sparsified:
            self.sparsifier.check_pattern(state)
            info = self.sparsifier.sparsified
            meta = {"method": self.sparsity_cfg.method, "config": _plain(self.sparsity_cfg),
                    **_plain(self.sparsifier.describe())}  # estimator, stage in force, init...
        mc = self.model_cfg
        if mc.kind == "hf" and mc.sparse_ift in HF_TRANSFORMED_KINDS:  # not a transformers architecture
            out = export_sparse_ift_hf_directory(self.module, mc.sparse_ift, mc.sparse_ift_sparsity, mc.path,
                                                 path, state, info, meta)
        elif mc.kind == "hf":
            out = export_hf_directory(self.module, mc.path, path, state, info, meta)
        else:
            out = export_gpt_directory(self.module, path, state, info, meta)
        return str(out)

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, path: str, extra: CheckpointExtra | None = None) -> None:
        """Write this rank's part of a checkpoint into `path` (a staging directory; see
        trainer/checkpoint.py for the atomic commit). Collective."""
        self.engine.save_checkpoint(path, tag=DS_TAG, save_latest=False)
        save_rank_state(path, self.rank, {
            "step": self.step, "rank": self.rank, "world_size": self.world_size, "rng": rng_state(),
            "sparsity": None if self.sparsifier is None else self.sparsifier.state_dict(),
            "extra": (extra or CheckpointExtra()).to_state()})

    def load_checkpoint(self, path: str) -> CheckpointExtra:
        """Restore model, optimizer, sparsity state, RNG and step from committed checkpoint
        `path`; return `extra`. The files this rank reads are checked against the manifest's
        sizes and digests first, and nothing is loaded in a way that can run code from it.
        Raises CheckpointError naming the checkpoint when anything does not check or load."""
        manifest = read_manifest(path)
        verify_files(path, manifest, files_for_rank(manifest, self.rank))
        state = load_rank_state(path, self.rank)
        if state.get("world_size") != self.world_size or state.get("rank") != self.rank:
            raise CheckpointError(f"checkpoint {path}: {rank_file(path, self.rank).name} was written by rank "
                                  f"{state.get('rank')} of {state.get('world_size')}; this is rank {self.rank} of {self.world_size}")
        for key in ("step", "rng", "sparsity", "extra"):
            if key not in state:
                raise CheckpointError(f"checkpoint {path}: {rank_file(path, self.rank).name} has no {key!r}")
        if (state["sparsity"] is None) != (self.sparsifier is None):
            raise CheckpointError(f"checkpoint {path}: sparsity state {'missing' if state['sparsity'] is None else 'present'}, "
                                  f"but this run is {'sparse' if self.sparsifier is not None else 'dense'}")
        try:
            with weights_only_torch_load(deepspeed_safe_globals()):
                loaded, _ = self.engine.load_checkpoint(path, tag=DS_TAG, load_optimizer_states=True,
                                                        load_lr_scheduler_states=False)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load it: {type(e).__name__}: {e}") from e
        if loaded is None:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed found no state under {DS_TAG}/")
        if self.sparsifier is not None:
            self.sparsifier.load_state_dict(state["sparsity"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        return CheckpointExtra.from_state(state["extra"], f"checkpoint {path}: {rank_file(path, self.rank).name}")

    def get_step(self) -> int:
        return self.step

    def shutdown(self) -> None:
        destroy_distributed()


class _MetricSums:
    """Accumulate objective metrics over micro batches: `sum/*` keys add up, `*_max` keys take the
    maximum, others average over the micro batches that reported them (a metric such as
    logprob_mismatch exists only where the batch has rows of the current version)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            v = float(v)
            if k.endswith("_max"):
                self.totals[k] = max(self.totals.get(k, v), v)
            else:
                self.totals[k] = self.totals.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def result(self) -> dict[str, float]:
        return {k: (v if k.startswith("sum/") or k.endswith("_max") else v / self.counts[k])
                for k, v in self.totals.items()}


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms): the usual GPT recipe."""
    decay = [p for _, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _plain(x):
    """A JSON-ready copy of a config/mapping (dataclasses, tuples, tensors of names)."""
    from dataclasses import is_dataclass

    if is_dataclass(x):
        return _plain(asdict(x))
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_plain(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
