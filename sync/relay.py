"""Relaying an update node to node, so the trainer nodes send each byte once however many
rollout nodes there are.

Ray moves an object to a node once and every receiver there shares that copy, but K rollout
nodes that fetch the same part pull it K times, mostly from the trainer node (Ray's pull manager
picks a random node among those that hold it). A relayed update is the same WeightUpdate whose
parts are served from another node: for every part, a zero-CPU task pinned to that node takes
the part as its argument (Ray pulls it into that node's object store, once, shared with the
node's own receivers) and returns it, which stores a copy there (whatever its size); receivers
given the relayed update pull from that node. Relaying a relayed update chains, so the nodes form a tree
(`relay_parents`, fan-out `sync.relay_fanout`) that is pipelined part by part: a node forwards
part 0 while part 1 is still arriving. The default is a chain (fan-out 1): every link carries each
byte once in and once out, and the whole update takes about one payload's link time plus one
part's per hop; a tree of fan-out k is shallower (log_k of the nodes) but each relay node sends k
copies over its own link, k times the time where the link is the bottleneck.

Failure: a relay node that dies loses its copies and its tasks fail; one that stalls delays them.
Either way a receiver downstream gets UpdateUnavailableError (at once, or after its fetch
timeout) and nothing is committed; the rollout group then has it fetch the original update from
the trainer nodes (launch/rl_rollouts.py).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from sync.payloads import Part, WeightUpdate

_serve_task: Any = None


def _serve(buckets: list) -> list:
    """Runs on the relay node: its argument was pulled there; the return value is stored there."""
    return buckets


def relay_update(update: WeightUpdate, node_id: str) -> WeightUpdate:
    """`update` with every part served from the Ray node `node_id` (see the module docstring);
    an update without parts is returned as it is."""
    global _serve_task
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not any(update.steps):
        return update
    if _serve_task is None:
        # No retries: a relay node that is gone must fail its downstream fetch, not re-run
        # elsewhere. Ray returns a task's result under 100 KB inline to the caller (the driver,
        # often on the trainer node), not into the executing node's store, so small parts (a
        # sparse delta's) would all flow through the driver; the relay's worker processes store
        # every result in their node's store instead (their own runtime env, started once per node).
        _serve_task = ray.remote(num_cpus=0, max_retries=0,
                                 runtime_env={"env_vars": {"RAY_max_direct_call_object_size": "0"}})(_serve)
    task = _serve_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    steps = [[Part(part.keys, task.remote(part.ref)) for part in step] for step in update.steps]
    return replace(update, steps=steps)


def relay_parents(count: int, fanout: int) -> list[int | None]:
    """Node j's parent in a relay tree over `count` nodes taken in order: None (fetch from the
    trainer nodes) for node 0, and for every node with fanout 0 (no relay); otherwise node
    (j - 1) // fanout (fanout 1: a chain)."""
    if fanout <= 0:
        return [None] * count
    return [None if j == 0 else (j - 1) // fanout for j in range(count)]
