"""What a rollout worker hands back across the actor boundary (typed, so the driver reads fields,
not dict keys). Its weight updates' stats are sync/payloads.py SyncStats.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sync.payloads import SyncStats


@dataclass
class RolloutBatch:
    """One worker's share of an RL step: `len(prompts) * G` rows, groups of G consecutive rows
    sharing a prompt.

    tokens / logprobs [N, T], lengths / finished / rewards [N]; `prompt_ids[i]` the prompt tokens
    of row i. `rewards` is the weighted sum over the reward functions, `reward_components` each
    function's own rewards by name. `prompts` are the prompts as given (a string or chat
    messages), one per group; `completions` the decoded completion of every row."""

    worker_id: int
    version: int
    prompt_ids: list[list[int]]
    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    rewards: torch.Tensor
    reward_failures: list[str] = field(default_factory=list)
    reward_components: dict[str, list[float]] = field(default_factory=dict)
    prompts: list[Any] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    gen_s: float = 0.0
    sync: SyncStats | None = None  # the weight swap before this batch (None when none)

    @property
    def size(self) -> int:
        return int(self.rewards.numel())


@dataclass
class EvalResult:
    """One worker's share of an evaluation: per prompt, the greedy completion's reward and
    whether any of k sampled completions passed."""

    version: int
    greedy_rewards: list[float]
    passed: list[bool]
    reward_failures: int = 0


@dataclass
class WeightCheck:
    """A worker's weights checked now (RolloutWorker.verify_weights): the version it holds, the
    checksum of its committed weights read again from memory, and, for an engine that keeps its
    own copy (vLLM), the mean |engine logprob - reference logprob| over a fixed probe batch, the
    reference being the model computed from those committed weights (None: the engine computes
    with the committed tensors themselves)."""

    version: int | None
    checksum: str
    engine_logprob_diff: float | None = None
