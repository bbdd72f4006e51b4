"""Start or join Ray, and reserve the trainers' resources or say clearly why not.

`cluster.address` null starts an in-process local Ray (`num_cpus` logical CPUs, default this
machine's cores); `auto` or `host:port` joins a running cluster (also what `ray job submit`
gives the driver). If Ray is already initialized in this process (tests, notebooks), it is used
as is and left running.

Resources are reserved with a placement group, one bundle per trainer rank. A request larger
than the cluster's totals fails at once; one that fits the totals but cannot be placed (busy
nodes, no node large enough for a bundle) fails after `placement_timeout_s`, never hangs.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

from models.checks import check_settings


@dataclass
class ClusterConfig:
    address: str | None = None  # null: local Ray in this process; "auto" or "host:port": join
    num_cpus: int | None = None  # local Ray only: logical CPUs (null: os.cpu_count())
    num_gpus: int | None = None  # local Ray only (null: detected)
    trainers: int = 2  # data-parallel ranks, one Ray actor each
    cpus_per_trainer: float = 1.0
    gpus_per_trainer: float | None = 0.0  # null: 1 when the Ray cluster has GPUs, else 0 (cluster=existing)
    resources_per_trainer: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    placement_timeout_s: float = 60.0
    setup_timeout_s: float = 600.0  # actors' process-group join + model build (first DeepSpeed use JIT-builds an op)


class ClusterResourceError(RuntimeError):
    """The requested actors do not fit the Ray cluster's resources."""


STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def gpus_per_trainer(cfg: ClusterConfig) -> float:
    """cluster.gpus_per_trainer, with null derived from the running cluster: one GPU per rank
    when it has GPUs, none on a CPU-only cluster."""
    if cfg.gpus_per_trainer is not None:
        return float(cfg.gpus_per_trainer)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def trainer_bundle(cfg: ClusterConfig) -> dict[str, float]:
    bundle = {"CPU": float(cfg.cpus_per_trainer)}
    gpus = gpus_per_trainer(cfg)
    if gpus:
        bundle["GPU"] = gpus
    bundle.update({k: float(v) for k, v in cfg.resources_per_trainer.items()})
    return {k: v for k, v in bundle.items() if v > 0}


def validate_cluster_config(cfg: ClusterConfig) -> None:
    check_settings(ClusterResourceError, [
        (cfg.trainers >= 1, f"cluster.trainers={cfg.trainers}: expected >= 1"),
        (cfg.placement_strategy in STRATEGIES,
         f"cluster.placement_strategy={cfg.placement_strategy!r}: expected one of {STRATEGIES}"),
        (cfg.cpus_per_trainer >= 0 and (cfg.gpus_per_trainer or 0) >= 0,
         "cluster.cpus_per_trainer and cluster.gpus_per_trainer must be >= 0"),
    ])


@contextmanager
def ray_cluster(cfg: ClusterConfig):
    """Start or join Ray for the duration of the block; shut down only what this call started."""
    import ray

    started = False
    if not ray.is_initialized():
        if cfg.address:
            ray.init(address=cfg.address, include_dashboard=False, log_to_driver=True)
        else:
            # address="local": a new instance even when another Ray runs on this machine
            # (plain ray.init() would join that one).
            ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), num_gpus=cfg.num_gpus,
                     include_dashboard=False, log_to_driver=True)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def reserve(bundles: list[dict[str, float]], strategy: str, timeout_s: float, what: str):
    """A ready placement group for `bundles`, or ClusterResourceError naming what is missing."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    total = ray.cluster_resources()
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    short = {k: (v, total.get(k, 0.0)) for k, v in need.items() if v > total.get(k, 0.0) + 1e-9}
    if short:
        detail = ", ".join(f"{k}: need {v:g}, cluster has {have:g}" for k, (v, have) in short.items())
        raise ClusterResourceError(f"{what} need more than the Ray cluster has ({detail}); "
                                   "lower cluster.trainers or the per-trainer resources, or add nodes")
    pg = placement_group(bundles, strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ClusterResourceError(
            f"{what} ({len(bundles)} x {bundles[0]}, strategy {strategy}) could not be placed within "
            f"{timeout_s:g} s; cluster total {_fmt(total)}, available now {_fmt(ray.available_resources())}. "
            "Another job may hold them, or no node is large enough for one bundle."
        ) from None
    return pg


def _fmt(resources: dict) -> str:
    keep = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or not k.startswith(("node:", "memory", "object_store"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"
