"""Two TrainerWorker ranks under DeepSpeed ZeRO-3 in spawned processes (gloo, CPU), for the
ZeRO-3 sparsity tests. Each rank trains every case in turn and saves what the test compares
(masks, published weights, its local partitions) with torch.save; no Ray needed.

Parameters are partitioned for real: the worker's DeepSpeed config gets
`stage3_param_persistence_threshold: 0`, so even the tiny test model's weights stay split
across the ranks between forwards (by default DeepSpeed keeps parameters under 1e5 elements
gathered on every rank, which would hide partitioning bugs).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from models import ModelConfig
from trainer.checkpoint import CheckpointExtra, commit, step_dir_name
from trainer.config import OptimizerConfig, TrainerConfig
from trainer.sparsity import SparsityConfig
from trainer.worker import TrainerWorker

SEQ = 16
MICRO = 4
OPTIMIZER = OptimizerConfig(lr=3e-3, warmup_steps=1, min_lr=3e-4)


class PartitionedWorker(TrainerWorker):
    def _ds_config(self) -> dict:
        config = super()._ds_config()
        if self.cfg.zero_stage == 3:
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return config


def rank_batch(step: int, rank: int) -> dict:
    """Rank `rank`'s rows of the global batch of `step`: a counting pattern from random bytes."""
    rng = np.random.default_rng(1000 * step + rank)
    start = rng.integers(0, 200, size=(MICRO, 1))
    return {"tokens": (start + np.arange(SEQ + 1)[None]) % 256}


def global_batch(step: int, world_size: int = 2) -> dict:
    """Every rank's rows of `step`, in rank order (what a single rank with grad_accum=world sees)."""
    return {"tokens": np.concatenate([rank_batch(step, r)["tokens"] for r in range(world_size)])}


def make_worker(case: dict, rank: int, world_size: int, zero_stage: int, port: int, micro: int = MICRO,
                cls: type = PartitionedWorker) -> TrainerWorker:
    cfg = TrainerConfig(max_steps=case["total_steps"], seq_len=SEQ, micro_batch_size=micro,
                        zero_stage=zero_stage, precision=case.get("precision", "fp32"), device="cpu", seed=0)
    worker = cls(ModelConfig(**case["model"]), cfg, OPTIMIZER, SparsityConfig(**case["sparsity"]),
                 rank=rank, world_size=world_size)
    worker.setup("127.0.0.1", port)
    return worker


def _result(worker: TrainerWorker, losses: list[float]) -> dict:
    access = worker.param_access
    names = access.names()
    masters = {n: access.get(n).detach().cpu().clone() for n in names}  # collective: same order on every rank
    layers = worker.sparsifier.layers
    partitions = {}
    for n in names:
        part = access.local_partition(n)
        share = part.masked(layers[n].mask if n in layers else None)  # what this rank would publish
        partitions[n] = (part.start, part.end, part.fp32.detach().cpu().clone(), share.cpu())
    param = dict(worker.module.named_parameters())
    return {
        "losses": losses,
        "sparsity": worker.sparsifier.state_dict(),
        "masters": masters,
        "partitions": partitions,
        "partitioned": {n: int(param[n].data.numel()) == 0 for n in names},  # split across ranks right now
        "published": worker.published_state("float32"),  # rank 0 only
    }


def probe_set(worker: TrainerWorker, name: str) -> dict:
    """Write a known value into `name`'s master through ParamAccess.set, zero the moments at its
    even positions, and read back the master, the moments and the weight a forward would gather."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters
    from deepspeed.utils import safe_get_full_optimizer_state

    access = worker.param_access
    param = dict(worker.module.named_parameters())[name]
    before = {k: safe_get_full_optimizer_state(param, k).detach().clone() for k in ("exp_avg", "exp_avg_sq")}
    value = torch.arange(param.ds_numel, dtype=torch.float32).reshape(param.ds_shape) / param.ds_numel
    positions = (torch.arange(param.ds_numel) % 2 == 0).reshape(param.ds_shape)
    access.set(name, value)
    access.reset_optimizer_state(name, positions)
    with GatheredParameters([param]):
        working = param.detach().float().clone()
    after = {k: safe_get_full_optimizer_state(param, k).detach().clone() for k in ("exp_avg", "exp_avg_sq")}
    return {"value": value, "positions": positions, "master": access.get(name).detach().clone(),
            "working": working, "moments_before": before, "moments_after": after}


def frozen_copy_logits(worker: TrainerWorker, batch: dict) -> dict:
    """Eval logits of the engine (ZeRO-3, masked forward) and of trainer/frozen_copy.py's copy."""
    from models import build_model
    from trainer.frozen_copy import frozen_copy

    masks = {name: layer.mask for name, layer in worker.sparsifier.layers.items()}
    copy = frozen_copy(worker.module, lambda: build_model(worker.model_cfg)[0], masks)
    tokens = torch.as_tensor(batch["tokens"])[:, :-1]
    worker.engine.eval()
    with torch.no_grad():
        engine = worker.engine(tokens).logits.clone()
        frozen = copy.eval()(tokens).logits.clone()
    worker.engine.train()
    return {"engine": engine, "copy": frozen, "copy_is_partitioned": any(hasattr(p, "ds_id") for p in copy.parameters())}


def rank_main(rank: int, port: int, cases: list[dict], out_dir: str) -> None:
    """Train every case for its `steps` on this rank and save `case_{i}_rank_{rank}.pt`; a case
    with `resume_at` also saves there, continues, and has a fresh worker load and continue."""
    torch.set_num_threads(1)
    for i, case in enumerate(cases):
        worker = make_worker(case, rank, 2, 3, port)
        losses = []
        resume_at = case.get("resume_at")
        checkpoint = None
        for step in range(case["steps"]):
            if step == resume_at:  # both ranks write into one staging dir; rank 0 commits it (with its manifest)
                staging = Path(out_dir) / f".staging_{i}"
                staging.mkdir(exist_ok=True)
                worker.save_checkpoint(str(staging), CheckpointExtra(driver={"case": i}))
                dist.barrier()
                if rank == 0:
                    (Path(out_dir) / f"checkpoints_{i}").mkdir(exist_ok=True)
                    commit(staging, Path(out_dir) / f"checkpoints_{i}", step, {})
                dist.barrier()
                checkpoint = Path(out_dir) / f"checkpoints_{i}" / step_dir_name(step)
            losses.append(worker.train_step(rank_batch(step, rank))["loss"])
        result = _result(worker, losses)
        if resume_at is not None:
            fresh = make_worker(case, rank, 2, 3, port)
            assert fresh.load_checkpoint(str(checkpoint)) == CheckpointExtra(driver={"case": i})
            resumed = [fresh.train_step(rank_batch(step, rank))["loss"] for step in range(resume_at, case["steps"])]
            result["resumed"] = _result(fresh, resumed)
        if case.get("frozen_copy"):
            result["frozen_copy"] = frozen_copy_logits(worker, rank_batch(99, rank))
        if case.get("probe_set"):
            result["probe_set"] = probe_set(worker, case["probe_set"])
        torch.save(result, Path(out_dir) / f"case_{i}_rank_{rank}.pt")


def run_two_ranks(cases: list[dict], out_dir: Path, timeout_s: float = 600.0) -> list[list[dict]]:
    """Run `cases` on two spawned ZeRO-3 ranks; results[case][rank]. Kills the ranks on timeout."""
    import torch.multiprocessing as mp

    from trainer.distributed import free_port

    context = mp.start_processes(rank_main, args=(free_port(), cases, str(out_dir)), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"two ZeRO-3 ranks did not finish {len(cases)} cases in {timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [[torch.load(out_dir / f"case_{i}_rank_{r}.pt", map_location="cpu", weights_only=False) for r in range(2)]
            for i in range(len(cases))]


def reference_run(case: dict, port: int) -> dict:
    """The same training on ONE rank (ZeRO-1, one micro batch of both ranks' rows): the data-parallel
    run must compute the same thing (same mean loss; gradients averaged over ranks). Runs in the
    calling process."""
    worker = make_worker(case, 0, 1, 1, port, micro=2 * MICRO, cls=TrainerWorker)
    losses = [worker.train_step(global_batch(step))["loss"] for step in range(case["steps"])]
    masters = {n: worker.param_access.get(n).detach().float().clone() for n in worker.sparsifier.layers}
    return {"losses": losses, "sparsity": worker.sparsifier.state_dict(), "masters": masters,
            "published": worker.published_state("float32")}
