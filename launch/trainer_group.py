"""The trainer actor group: N TrainerWorker actors, one data-parallel rank each.

The driver sees one object with coarse methods; each call fans out to every rank and gathers
(metrics are merged: `sum/*` keys add up over ranks, the rest average; tensors come from rank 0).
Rank 0's node IP and a free port there become every rank's MASTER_ADDR/PORT.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from launch.cluster import ClusterConfig, reserve, trainer_bundle
from models import ModelConfig
from trainer.checkpoint import CheckpointExtra
from trainer.config import OptimizerConfig, TrainerConfig
from trainer.objectives import Objective
from trainer.worker import RankInfo, TrainerWorker

if TYPE_CHECKING:
    from ray.actor import ActorClass


class TrainerSetupTimeout(RuntimeError):
    """The trainer ranks did not finish their setup in time."""


class TrainerGroup:
    def __init__(self, cluster_cfg: ClusterConfig, model_cfg: ModelConfig, trainer_cfg: TrainerConfig,
                 optimizer_cfg: OptimizerConfig, sparsity_cfg=None, objective: Objective | None = None,
                 placement_group=None, worker_cls: type[TrainerWorker] = TrainerWorker):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.world_size = cluster_cfg.trainers
        bundle = trainer_bundle(cluster_cfg)
        self._owns_pg = placement_group is None
        self.placement_group = placement_group or reserve(
            [bundle] * self.world_size, cluster_cfg.placement_strategy, cluster_cfg.placement_timeout_s,
            f"cluster.trainers={self.world_size} trainer actors")
        remote_cls: ActorClass[TrainerWorker] = ray.remote(worker_cls)
        # Actor handles: their methods resolve at run time (Ray's ActorHandle types every attribute
        # as Never, which would end type checking of the code using them).
        self.workers: list[Any] = [
            remote_cls.options(
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=rank),
                name=None,
            ).remote(model_cfg, trainer_cfg, optimizer_cfg, sparsity_cfg, objective, rank, self.world_size)
            for rank in range(self.world_size)
        ]
        try:
            master_addr, master_port = ray.get(self.workers[0].rendezvous_address.remote())
            self.master = (master_addr, master_port)
            try:
                self.info: list[RankInfo] = ray.get([w.setup.remote(master_addr, master_port) for w in self.workers],
                                    timeout=cluster_cfg.setup_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise TrainerSetupTimeout(
                    f"the {self.world_size} trainer ranks did not finish setting up (process group, model, DeepSpeed) "
                    f"within cluster.setup_timeout_s={cluster_cfg.setup_timeout_s:g}; a machine this loaded needs more, "
                    f"or a stale DeepSpeed build lock (.torch_extensions/*/lock, left by a killed build) blocks them"
                ) from None
        except BaseException:
            self.shutdown()  # do not leave actors or the reservation behind
            raise

    def call_per_rank(self, method: str, *per_rank_args: list, **shared) -> list:
        """Call `method` on every rank; positional args are lists with one entry per rank."""
        import ray

        return ray.get([getattr(w, method).remote(*(a[r] for a in per_rank_args), **shared)
                        for r, w in enumerate(self.workers)])

    def call(self, method: str, *args, **kwargs) -> list:
        """Call `method(*args, **kwargs)` on every rank with the same arguments; results by rank."""
        import ray

        return ray.get([getattr(w, method).remote(*args, **kwargs) for w in self.workers])

    def train_step(self, batches: list, method: str = "train_step") -> dict[str, float]:
        """One optimizer step (the ranks' `method`); `batches[r]` is rank r's share.
        `tokens_per_s` counts all ranks over the wall time of the whole step as the driver sees it."""
        started = time.perf_counter()
        metrics = merge_metrics(self.call_per_rank(method, batches))
        seconds = time.perf_counter() - started
        if "sum/tokens" in metrics:
            metrics["tokens_per_s"] = metrics["sum/tokens"] / seconds
        metrics["step_s"] = seconds
        return metrics

    def evaluate(self, batches: list[list[dict]]) -> dict[str, float]:
        """`batches[r]` is rank r's list of eval batches; metrics averaged over ranks."""
        return merge_metrics(self.call_per_rank("evaluate", batches))

    def save_checkpoint(self, path: str, extra: CheckpointExtra | None = None) -> None:
        self.call("save_checkpoint", str(path), extra or CheckpointExtra())

    def load_checkpoint(self, path: str) -> CheckpointExtra:
        return self.call("load_checkpoint", str(path))[0]

    def published_state(self, dtype: str = "bfloat16") -> dict[str, Any]:
        return self.call("published_state", dtype)[0]

    def export(self, path: str, dtype: str = "float32") -> str:
        return self.call("export", str(path), dtype)[0]

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self._owns_pg:
            remove_placement_group(self.placement_group)


def merge_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One metrics dict from every rank's: `sum/*` keys add up, `*_max` keys take the maximum,
    the rest average over the ranks that reported them."""
    keys = {k for m in per_rank for k in m}
    out = {}
    for k in keys:
        values = [float(m[k]) for m in per_rank if k in m]
        if k.startswith("sum/"):
            out[k] = sum(values)
        elif k.endswith("_max"):
            out[k] = max(values)
        else:
            out[k] = sum(values) / len(values)
    return out
