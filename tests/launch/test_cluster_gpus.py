"""cluster.gpus_per_trainer=null (cluster=existing) follows the cluster: a GPU per trainer rank when
it has GPUs, none on a CPU-only cluster."""
from __future__ import annotations

import ray

from launch.cluster import ClusterConfig, trainer_bundle


def test_null_gpus_per_trainer_is_derived_from_the_cluster(monkeypatch):
    cfg = ClusterConfig(address="auto", gpus_per_trainer=None, cpus_per_trainer=2)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})
    assert trainer_bundle(cfg) == {"CPU": 2.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 8.0})
    assert trainer_bundle(cfg) == {"CPU": 2.0, "GPU": 1.0}
    assert trainer_bundle(ClusterConfig(gpus_per_trainer=0.5)) == {"CPU": 1.0, "GPU": 0.5}
