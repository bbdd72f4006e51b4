"""Shared fixtures. Tests that need Ray share one two-node local cluster per test session."""
from __future__ import annotations

import os
import secrets

import pytest

# One authentication setting for every Ray process the tests start (the shared cluster, the
# jobs on it, their workers), set before anything reads Ray's config, whatever ~/.ray holds:
# Ray 2.60 turns token mode on in a process that finds a ~/.ray/auth_token left by any local
# ray.init, so head, nodes and drivers could disagree.
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)

from launch.env import set_runtime_defaults  # noqa: E402

set_runtime_defaults()

from cluster_nodes import HEAD_NODE, SECOND_NODE  # noqa: E402  (pin actors in multi-node tests)


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-node Ray cluster on this machine (ray.cluster_utils.Cluster), shared by all tests.

    CPU slots are logical: the head has 4, the second node 4, so small actor groups fit on
    a 2-core machine. Pin an actor with `resources={SECOND_NODE: 0.01}`.
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "resources": {HEAD_NODE: 100}, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=4, resources={SECOND_NODE: 100})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
