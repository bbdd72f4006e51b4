"""Hugging Face causal LMs behind the models/gpt.py call convention (model.kind=hf).

`load_hf_model(cfg)` loads a local `save_pretrained` directory (config.json + safetensors,
tokenizer files when present) with no hub access, and returns `(model, tokenizer)`. With
`model.from_scratch=true` it builds config.json's architecture with fresh weights instead
(transformers' init; the weights in the directory are not read), Sparse-IFT applied when
`model.sparse_ift` is set (models/sparse_ift.py; only from scratch).

Contract of the returned module. It IS the transformers model (e.g. LlamaForCausalLM), not a
wrapper, so `named_parameters()` / `state_dict()` names are exactly the checkpoint's names
(`model.layers.0.self_attn.q_proj.weight`, `transformer.h.0.attn.c_attn.weight`, ...) and
`save_pretrained` / `from_pretrained` round-trip them. One forward pre-hook is added
(`follow_call_convention`) so it answers the built-in GPT's call:

    out = model(input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False)          # everything after input_ids by keyword
    out.logits, out.past_key_values

- With `attention_mask` and no `position_ids`, positions count real tokens only
  (`cumsum(mask) - 1`, as models/gpt.py and HF `generate` do), so left-padded rows see the same
  positions as unpadded ones. Transformers' own forward would use `arange` (wrong for absolute
  position embeddings such as GPT-2's under left padding).
- `past_key_values` is a transformers Cache object: opaque, hand it back to the model only. It is
  updated IN PLACE by the next forward (unlike the built-in GPT's tuples), so do not reuse an old
  one after feeding it forward.
- Tied embeddings (GPT-2 style): `named_parameters()` lists the shared tensor once
  (`transformer.wte.weight`); `state_dict()` lists it under both names.
- Dropout: every `*dropout` / `*pdrop` probability in config.json is set to `model.dropout`
  (default 0.0, as RL fine-tuning wants: trainer and rollout logprobs must agree). The model
  comes back in eval mode (transformers' choice).
- Casting: `cast_parameters(model, dtype)` gives the same module as transformers' own bf16
  loading (bit for bit): derived non-persistent buffers (RoPE `inv_freq`) stay float32, where
  `model.to(bf16)` would round the rotary frequencies (an error that grows with position).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from models.build import ModelConfigError
from models.config import ModelConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """Map model.dtype ('float32' | 'bfloat16' | 'float16') to a torch dtype."""
    if name not in TORCH_DTYPES:
        raise ModelConfigError(f"model.dtype={name!r} is unknown; expected one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def check_hf_directory(path: str | None) -> Path:
    """Validate `model.path` before anything heavy runs; return it as a Path."""
    if not path:
        raise ModelConfigError("model.path is required for model.kind=hf (a save_pretrained directory)")
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelConfigError(f"model.path={path!r} does not exist")
    if not p.is_dir():
        raise ModelConfigError(f"model.path={path!r} is not a directory (expected a save_pretrained directory)")
    if not (p / "config.json").is_file():
        raise ModelConfigError(f"model.path={path!r} has no config.json (expected a save_pretrained directory)")
    return p


def load_hf_config(path: str | Path):
    """Read config.json and check it describes a decoder-only causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    p = check_hf_directory(str(path))
    try:
        config = AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # malformed JSON, unknown model_type, remote code required, ...
        raise ModelConfigError(f"model.path={str(path)!r}: config.json could not be read: {e}") from e
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelConfigError(
            f"model.path={str(path)!r}: config model_type={model_type!r} is not a causal LM "
            "(not in transformers' AutoModelForCausalLM mapping)"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ModelConfigError(
            f"model.path={str(path)!r}: config model_type={model_type!r} is an encoder-decoder; "
            "expected a decoder-only causal LM"
        )
    # BERT, RoBERTa, ... can be built "for causal LM", but with is_decoder=false they are
    # bidirectional encoders: loading one as a decoder would be wrong work.
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise ModelConfigError(
            f"model.path={str(path)!r}: config model_type={model_type!r} with is_decoder=false is a "
            "bidirectional encoder, not a causal LM"
        )
    return config


def set_dropout(config, p: float) -> list[str]:
    """Set every dropout probability of an HF config (`*dropout`, `*pdrop`) to `p`; returns the
    names set."""
    names = [
        k for k, v in config.to_dict().items()
        if (k.endswith("dropout") or k.endswith("pdrop")) and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    for k in names:
        setattr(config, k, p)
    return names


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and persistent buffers to `dtype` in place; non-persistent
    buffers (constants derived from the config, e.g. RoPE inv_freq) keep their precision."""
    keep = set()
    for mod_name, module in model.named_modules():
        for b in getattr(module, "_non_persistent_buffers_set", ()):
            keep.add(f"{mod_name}.{b}" if mod_name else b)
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    for mod_name, module in model.named_modules():
        for b_name, b in list(module._buffers.items()):
            full = f"{mod_name}.{b_name}" if mod_name else b_name
            if b is not None and b.is_floating_point() and full not in keep:
                module._buffers[b_name] = b.to(dtype)
    return model


def load_hf_weights(path: str | Path, dtype: str = "float32", config=None) -> nn.Module:
    """Load the causal LM from a local directory; raise if any weight is missing, unexpected or
    of the wrong shape (transformers would otherwise initialise it randomly and only log)."""
    from transformers import AutoModelForCausalLM

    config = load_hf_config(path) if config is None else config
    try:
        # transformers types the result as the model alone; output_loading_info=True makes it a pair.
        loaded: tuple[nn.Module, dict[str, list]] = AutoModelForCausalLM.from_pretrained(  # type: ignore[assignment]
            str(path), config=config, local_files_only=True, trust_remote_code=False,
            dtype=torch_dtype(dtype), output_loading_info=True,
            # Shape mismatches are collected below and raised with their names, not re-initialised.
            ignore_mismatched_sizes=True,
        )
    except ModelConfigError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # no weights file, unreadable safetensors, ...
        raise ModelConfigError(f"model.path={str(path)!r}: weights could not be loaded: {e}") from e
    model, info = loaded
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if info.get("error_msgs"):
        problems.append("errors: " + "; ".join(map(str, info["error_msgs"]))[:500])
    if problems:
        raise ModelConfigError(
            f"model.path={str(path)!r}: weights do not match config.json ({type(model).__name__}): "
            + " | ".join(problems)
        )
    return model


def _positions_from_attention_mask(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: fill position_ids from a 2-D attention_mask (see module docstring)."""
    if len(args) > 1:
        raise TypeError(
            f"{type(module).__name__}: pass every argument after input_ids by keyword "
            "(attention_mask=..., position_ids=..., past_key_values=..., use_cache=...)"
        )
    mask = kwargs.get("attention_mask")
    if kwargs.get("position_ids") is not None or mask is None or mask.dim() != 2:
        return None
    ids = args[0] if args else kwargs.get("input_ids")
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None:
        return None
    T = ids.shape[1]
    # Positions count real tokens; left padding gets 0 (never attended to by real tokens).
    kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
    return args, kwargs


def follow_call_convention(model: nn.Module) -> nn.Module:
    """Make a transformers causal LM answer the models/gpt.py call convention (idempotent).
    Returns the same module; parameter names are unchanged."""
    if not getattr(model, "_follows_call_convention", False):
        model.register_forward_pre_hook(_positions_from_attention_mask, with_kwargs=True)
        setattr(model, "_follows_call_convention", True)
    return model


def _build_from_config(cfg: ModelConfig, config, path: Path) -> nn.Module:
    """config's architecture with fresh weights (on the default device: meta for a skeleton),
    transformed by model.sparse_ift."""
    from transformers import AutoModelForCausalLM

    from models.sparse_ift import hf_wide_config, transform_hf_decoder

    if cfg.sparse_ift == "wide":
        config = hf_wide_config(config, cfg.sparse_ift_sparsity)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(cfg.dtype), trust_remote_code=False)
    except Exception as e:  # inconsistent config values (e.g. heads not dividing hidden size)
        raise ModelConfigError(f"model.path={str(path)!r}: config.json does not build a model: {e}") from e
    if cfg.sparse_ift != "none":
        transform_hf_decoder(model, cfg.sparse_ift, cfg.sparse_ift_sparsity)
    return model


def _check_sparse_ift_from_scratch(cfg: ModelConfig) -> None:
    if cfg.sparse_ift != "none" and not cfg.from_scratch:
        from models.sparse_ift import SparseIFTConfigError

        raise SparseIFTConfigError(
            f"sparse_ift={cfg.sparse_ift!r} with model=hf needs model.from_scratch=true: Sparse-IFT trains the "
            f"transformed architecture from random init, it does not transform the pretrained weights in model.path"
        )


def load_hf_skeleton(cfg: ModelConfig):
    """(model on the meta device, Tokenizer): every check of load_hf_model except reading the
    weights, in well under a second even for a large model. For drivers: validate the path,
    config, tokenizer, sparsity patterns and N:M shapes before any actor starts. Module and
    parameter names are those of the loaded (or, from scratch, built) model."""
    from models.hf_tokenizer import load_tokenizer

    _check_sparse_ift_from_scratch(cfg)
    torch_dtype(cfg.dtype)
    path = check_hf_directory(cfg.path)
    config = load_hf_config(path)
    tokenizer = load_tokenizer(path, config.vocab_size)
    set_dropout(config, cfg.dropout)
    with torch.device("meta"):
        model = _build_from_config(cfg, config, path)
    return model, tokenizer


def load_hf_model(cfg: ModelConfig):
    """Return (transformers causal LM following the call convention, Tokenizer) for a local
    save_pretrained directory `cfg.path`, in `cfg.dtype`: its weights, or with cfg.from_scratch
    its architecture freshly initialised (under the caller's torch seed). Raises
    ModelConfigError on bad input, SparseIFTConfigError for sparse_ift on pretrained weights.
    Under a meta default device (`with torch.device("meta"): build_model(cfg)`, as drivers do
    to check shapes) it returns the weightless skeleton, like the built-in GPT would."""
    from models.hf_tokenizer import load_tokenizer

    if torch.empty(0).device.type == "meta":
        model, tokenizer = load_hf_skeleton(cfg)
        return follow_call_convention(model), tokenizer
    _check_sparse_ift_from_scratch(cfg)
    torch_dtype(cfg.dtype)  # fail on a bad dtype before reading anything
    path = check_hf_directory(cfg.path)
    config = load_hf_config(path)
    tokenizer = load_tokenizer(path, config.vocab_size)  # cheap checks before the weights
    set_dropout(config, cfg.dropout)
    if cfg.from_scratch:
        model = _build_from_config(cfg, config, path).eval()  # the mode from_pretrained returns
    else:
        model = load_hf_weights(path, cfg.dtype, config)
    return follow_call_convention(model), tokenizer
