"""Final weights out as a directory another program can load.

- `export_hf_directory`: an HF model's weights as a `save_pretrained` directory (config.json,
  generation_config.json, model.safetensors — sharded by transformers when large — tied weights
  stored once as transformers expects, tokenizer files copied) that
  `AutoModelForCausalLM.from_pretrained(out_dir)` loads.
- `export_gpt_directory` / `load_gpt_directory`: the built-in GPT as model.safetensors plus a
  config.json holding its GPTConfig.
- `export_sparse_ift_hf_directory` / `load_sparse_ift_hf_directory`: a Llama-family model under
  sparse_ift=parallel|factorized|doped (models/sparse_ift.py; not a transformers architecture) as
  model.safetensors plus a config.json holding its transformers config and the transformation,
  tokenizer files copied; sparse_ift=wide is an ordinary Llama and exports with export_hf_directory.
- `export_state`: a state dict by the model config's kind (one of the above).

Both write `sparsity.json` when given sparsity info:

    {"format": "sparsetrain-sparsity/1",
     "tensors": {"model.layers.0.self_attn.q_proj.weight": {"pattern": "2:4", "dim": 1,
                                                            "nonzero_fraction": 0.5}, ...}}

Per tensor, the caller says what it claims ({"pattern": "N:M", "dim": d}: at most N nonzeros in
every group of M consecutive entries along axis d; or {"density": x}; trainer/sparsity's
`Sparsifier.sparsified()` entries are accepted as they are); the export checks N:M claims
against the weights (ExportError when violated) and adds the measured nonzero fraction.
`sparsity_meta` adds top-level keys (e.g. {"method": "nm", "config": {...}}).

`model` may be a weightless skeleton (`with torch.device("meta"): build_model(cfg)`): only its
config, names and shapes are used, so a run's masked state can be exported after the fact.
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from models.nm_pattern import nm_violations, parse_nm

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from models.config import ModelConfig
    from models.gpt import GPT

SPARSITY_FILE = "sparsity.json"
SPARSITY_FORMAT = "sparsetrain-sparsity/1"
GPT_MODEL_TYPE = "sparsetrain-gpt"
# Not a transformers model_type: a vanilla from_pretrained fails instead of initialising the
# Llama weights it cannot find at random.
SPARSE_IFT_HF_MODEL_TYPE = "sparsetrain-sparse-ift-hf"
# sparse_ift kinds whose model=hf export is not a transformers architecture
HF_TRANSFORMED_KINDS = ("parallel", "factorized", "doped")
# Tokenizer files copied beside an HF export (whatever of these the source directory has).
TOKENIZER_FILE_GLOBS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "chat_template.*", "*.tiktoken", "spiece.model", "sentencepiece*.model",
)


class ExportError(ValueError):
    pass


def _claimed_nm(pattern: object) -> tuple[int, int]:
    """(N, M) of a sparsity.json pattern claim: 'N:M' with 0 < N <= M (N = M: dense)."""
    try:
        n, m = parse_nm(pattern)
    except ValueError as e:
        raise ExportError(f"sparsity pattern {e}") from None
    if not 0 < n <= m:
        raise ExportError(f"sparsity pattern {pattern!r} needs 0 < N <= M")
    return n, m


def normalize_claim(claim: dict) -> dict:
    """Accept trainer/sparsity's `Sparsifier.sparsified()` entries too:
    {"kind": "nm", "n": 2, "m": 4, "input_dim": 1} -> {"pattern": "2:4", "dim": 1};
    {"kind": "unstructured", "density": 0.1} -> {"density": 0.1}."""
    if claim.get("kind") == "nm":
        rest = {k: v for k, v in claim.items() if k not in ("kind", "n", "m", "input_dim")}
        return {"pattern": f"{int(claim['n'])}:{int(claim['m'])}", "dim": int(claim["input_dim"]), **rest}
    if claim.get("kind") == "unstructured":
        return {k: v for k, v in claim.items() if k != "kind"}
    return dict(claim)


def _checked_sparsity_info(state: dict[str, torch.Tensor], info: dict[str, dict]) -> dict:
    tensors = {}
    for name, claim in info.items():
        if name not in state:
            raise ExportError(f"sparsity info names tensor {name!r}, which is not in the exported weights")
        t = state[name]
        claim = normalize_claim(claim)
        entry = dict(claim)
        if "pattern" in claim:
            n, m = _claimed_nm(claim["pattern"])
            if "dim" not in claim:
                raise ExportError(f"sparsity info for {name!r}: an N:M pattern needs 'dim' (the input axis)")
            try:
                bad = nm_violations(t, n, m, int(claim["dim"]))
            except ValueError as e:  # M does not divide the claimed dim
                raise ExportError(str(e)) from None
            if bad:
                raise ExportError(
                    f"tensor {name!r} is not {n}:{m} sparse along dim {claim['dim']}: {bad} groups have more than {n} nonzeros"
                )
        elif "density" not in claim:
            raise ExportError(f"sparsity info for {name!r} needs 'pattern' (with 'dim') or 'density'")
        entry["nonzero_fraction"] = float((t != 0).float().mean())
        tensors[name] = entry
    return {"format": SPARSITY_FORMAT, "tensors": tensors}


def _write_sparsity(out: Path, state: dict[str, torch.Tensor], info: dict[str, dict] | None,
                    meta: dict | None = None) -> None:
    if info:
        doc = _checked_sparsity_info(state, info)
        for key, value in (meta or {}).items():  # e.g. the method and its config, for readers
            doc.setdefault(key, value)
        (out / SPARSITY_FILE).write_text(json.dumps(doc, indent=1))


def _as_hf_model(model: nn.Module) -> PreTrainedModel:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ExportError(f"expected a transformers model (save_pretrained), got {type(model).__name__}")
    return model


def _as_gpt(model: nn.Module) -> GPT:
    from models.gpt import GPT

    if not isinstance(model, GPT):
        raise ExportError(f"expected the built-in GPT (models/gpt.py), got {type(model).__name__}")
    return model


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias name: kept name} for parameters that are the same Parameter object as an earlier
    one (e.g. GPT-2's lm_head.weight -> transformer.wte.weight; the first name is the one
    transformers keeps, and the one named_parameters() lists). Works on the meta device."""
    first_of: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first_of:
            aliases[name] = first_of[id(p)]
        else:
            first_of[id(p)] = name
    return aliases


def _canonical_state(model: nn.Module, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The tensors to save under the model's own names: every entry of model.state_dict(), taken
    from `state` when given (tied aliases may be absent from it: they are the same tensor).
    Tied aliases are dropped, keeping the first name (the one transformers keeps)."""
    own = model.state_dict(keep_vars=True)
    alias_of = tied_aliases(model)
    kept: dict[str, torch.Tensor] = {}
    if state is not None:
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise ExportError(f"exported state has tensors the model does not: {unknown[:6]}")
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, t in own.items():
        if name in alias_of:
            if state is not None and name in state and alias_of[name] in state:
                if not torch.equal(state[name].cpu(), state[alias_of[name]].cpu()):
                    raise ExportError(f"tied tensors {name!r} and {alias_of[name]!r} differ in the exported state")
            continue
        if state is None:
            value = t
        elif name in state:
            value = state[name]
        elif any(a in state for a, k in alias_of.items() if k == name):  # given under its tied alias
            value = state[next(a for a, k in alias_of.items() if k == name and a in state)]
        elif name not in params:
            value = t  # a persistent buffer the trainer does not track
        else:
            raise ExportError(f"exported state is missing parameter {name!r}")
        if value.device.type == "meta":
            raise ExportError(f"tensor {name!r} has no data (a meta-device skeleton): pass it in `state`")
        if tuple(value.shape) != tuple(t.shape):
            raise ExportError(f"exported tensor {name!r} has shape {tuple(value.shape)}, the model expects {tuple(t.shape)}")
        # Fresh CPU copies: safetensors refuses tensors that share storage (e.g. flat buffers).
        kept[name] = value.detach().to("cpu", copy=True).contiguous()
    return kept


def _weights_readable_like_the_rest(out: Path) -> None:
    """safetensors writes through a private temporary file (mode 0600): give the weight files the
    mode the process's umask gives every other file here (config.json, written plainly)."""
    mode = (out / "config.json").stat().st_mode & 0o777
    for f in out.glob("*.safetensors"):
        f.chmod(mode)


def _floating_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def export_hf_directory(
    model: nn.Module,
    tokenizer_source_dir: str | Path | None,
    out_dir: str | Path,
    state: dict[str, torch.Tensor] | None = None,
    sparsity_info: dict[str, dict] | None = None,
    sparsity_meta: dict | None = None,
) -> Path:
    """Write `state` (HF names, already masked; None: the model's own weights) as a
    save_pretrained directory of `model`'s architecture. The model itself is not modified.
    Tokenizer files are copied from `tokenizer_source_dir` (the model's own directory); when it
    has none, the model ran on the byte tokenizer, which is written as equivalent HF tokenizer
    files. None: no tokenizer files at all."""
    hf_model = _as_hf_model(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _canonical_state(hf_model, state)
    # save_pretrained writes config.json from model.config (dtype taken from the module): keep
    # the live model's config untouched and record the dtype actually written.
    saved_config = hf_model.config
    hf_model.config = copy.deepcopy(saved_config)
    try:
        hf_model.save_pretrained(str(out), state_dict=dict(tensors))  # it may consume the dict
    finally:
        hf_model.config = saved_config
    dtype = _floating_dtype(tensors)
    if dtype is not None:
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tokenizer_source_dir is not None:
        _copy_tokenizer_files(Path(tokenizer_source_dir), out)
    _write_sparsity(out, tensors, sparsity_info, sparsity_meta)
    _weights_readable_like_the_rest(out)
    return out


def _copy_tokenizer_files(src: Path, out: Path) -> None:
    """Tokenizer files of the model's own directory `src` into `out`; none there: the model ran
    on the byte tokenizer (models/hf_tokenizer.py), written out as HF tokenizer files."""
    if not src.is_dir():
        raise ExportError(f"tokenizer source {str(src)!r} is not a directory")
    copied = [f for g in TOKENIZER_FILE_GLOBS for f in src.glob(g) if f.is_file()]
    for f in copied:
        shutil.copy2(f, out / f.name)
    if not copied:
        from models.hf_tokenizer import save_byte_tokenizer_as_hf

        save_byte_tokenizer_as_hf(out)


def export_sparse_ift_hf_directory(
    model: nn.Module,
    kind: str,
    sparsity: float,
    tokenizer_source_dir: str | Path | None,
    out_dir: str | Path,
    state: dict[str, torch.Tensor] | None = None,
    sparsity_info: dict[str, dict] | None = None,
    sparsity_meta: dict | None = None,
) -> Path:
    """Write a Llama-family model transformed by sparse_ift=`kind` (parallel|factorized|doped) as
    model.safetensors (its own parameter names, tied weights once) + config.json
    ({"model_type": "sparsetrain-sparse-ift-hf", "hf_config": the transformers config,
    "sparse_ift": {"kind", "sparsity"}}), tokenizer files as export_hf_directory copies them."""
    if kind not in HF_TRANSFORMED_KINDS:
        raise ExportError(f"sparse_ift={kind!r}: expected one of {list(HF_TRANSFORMED_KINDS)} "
                          f"(none and wide export with export_hf_directory)")
    hf_model = _as_hf_model(model)
    config = {"model_type": SPARSE_IFT_HF_MODEL_TYPE, "hf_config": hf_model.config.to_dict(),
              "sparse_ift": {"kind": kind, "sparsity": float(sparsity)}}
    out = _write_own_layout(hf_model, out_dir, config, state, sparsity_info, sparsity_meta)
    if tokenizer_source_dir is not None:
        _copy_tokenizer_files(Path(tokenizer_source_dir), out)
    return out


def load_sparse_ift_hf_directory(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a directory written by export_sparse_ift_hf_directory back into the transformed
    transformers model (strict: every tensor present with its shape, nothing unknown), following
    the models/gpt.py call convention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.hf import follow_call_convention
    from models.sparse_ift import transform_hf_decoder

    p = Path(path)
    config = _read_own_config(p, SPARSE_IFT_HF_MODEL_TYPE)
    hf_fields = dict(config["hf_config"])
    hf_config = AutoConfig.for_model(hf_fields.pop("model_type"), **hf_fields)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    transform_hf_decoder(model, config["sparse_ift"]["kind"], float(config["sparse_ift"]["sparsity"]))
    _load_own_weights(model, p, device, "hf_config and sparse_ift")
    return follow_call_convention(model.to(device).eval())


def export_gpt_directory(
    model: nn.Module,
    out_dir: str | Path,
    state: dict[str, torch.Tensor] | None = None,
    sparsity_info: dict[str, dict] | None = None,
    sparsity_meta: dict | None = None,
) -> Path:
    """Write the built-in GPT as model.safetensors + config.json ({"model_type": "sparsetrain-gpt",
    "gpt_config": GPTConfig}); a tied lm_head is stored once (as wte.weight)."""
    config = {"model_type": GPT_MODEL_TYPE, "gpt_config": asdict(_as_gpt(model).config)}
    return _write_own_layout(model, out_dir, config, state, sparsity_info, sparsity_meta)


def _write_own_layout(model: nn.Module, out_dir: str | Path, config: dict, state: dict[str, torch.Tensor] | None,
                      sparsity_info: dict[str, dict] | None, sparsity_meta: dict | None) -> Path:
    """The project's own layout (the built-in GPT, transformed Sparse-IFT models): the canonical
    state as model.safetensors, `config` as config.json, sparsity.json when sparse."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _canonical_state(model, state)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_sparsity(out, tensors, sparsity_info, sparsity_meta)
    _weights_readable_like_the_rest(out)
    return out


def export_state(model_cfg: ModelConfig, out_dir: str | Path, state: dict[str, torch.Tensor]) -> Path:
    """`state` (the model's parameter names) written the way `model_cfg`'s kind exports: a
    save_pretrained directory for model=hf (export_sparse_ift_hf_directory's layout under
    sparse_ift=parallel|factorized|doped), export_gpt_directory's layout for the built-in GPT."""
    from models.build import build_model

    with torch.device("meta"):
        skeleton, _ = build_model(model_cfg)
    if model_cfg.kind == "hf" and model_cfg.sparse_ift in HF_TRANSFORMED_KINDS:
        return export_sparse_ift_hf_directory(skeleton, model_cfg.sparse_ift, model_cfg.sparse_ift_sparsity,
                                              model_cfg.path, out_dir, state)
    if model_cfg.kind == "hf":
        return export_hf_directory(skeleton, model_cfg.path, out_dir, state)
    return export_gpt_directory(skeleton, out_dir, state)


def load_gpt_directory(path: str | Path, device: str | torch.device = "cpu"):
    """Load a directory written by export_gpt_directory back into a GPT (strict: every
    parameter present with its shape, nothing unknown)."""
    from models.gpt import GPT, GPTConfig

    p = Path(path)
    config = _read_own_config(p, GPT_MODEL_TYPE)
    model = GPT(GPTConfig(**config["gpt_config"]))
    _load_own_weights(model, p, device, "gpt_config")
    return model.to(device)


def _read_own_config(p: Path, model_type: str) -> dict:
    """config.json of a directory in the project's own layout, which must be `model_type`."""
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{str(p)!r}: config.json could not be read: {e}") from e
    if config.get("model_type") != model_type:
        raise ExportError(f"{str(p)!r}: config.json model_type={config.get('model_type')!r}, expected {model_type!r}")
    return config


def _load_own_weights(model: nn.Module, p: Path, device: str | torch.device, config_name: str) -> None:
    """model.safetensors into `model`, strictly: every tensor present with its shape, nothing
    unknown (tied aliases are stored once); ExportError naming `config_name` otherwise."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(p / "model.safetensors"), device=str(device))
    except (OSError, ValueError) as e:
        raise ExportError(f"{str(p)!r}: model.safetensors could not be read: {e}") from e
    expected = set(model.state_dict()) - set(tied_aliases(model))
    if set(tensors) != expected:
        raise ExportError(
            f"{str(p)!r}: weights do not match {config_name}: missing {sorted(expected - set(tensors))[:6]}, "
            f"unexpected {sorted(set(tensors) - expected)[:6]}"
        )
    try:
        model.load_state_dict(tensors, strict=False)  # tied aliases are absent: they share storage
    except RuntimeError as e:  # shape mismatches
        raise ExportError(f"{str(p)!r}: weights do not match {config_name}: {e}") from e


def gpt_to_gpt2_config(cfg):
    """The transformers GPT2Config computing exactly what a built-in GPTConfig computes (exact
    GELU, LayerNorm eps 1e-5, no dropout; byte-tokenizer special ids)."""
    from transformers import GPT2Config

    from models.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
    )


def gpt_state_to_gpt2(model: nn.Module, state: dict[str, torch.Tensor] | None = None):
    """Map built-in GPT tensors to GPT-2 names: ({gpt2 name: tensor}, {gpt name: (gpt2 name,
    transposed)}). Linear weights become Conv1D weights ([out, in] -> [in, out]); a GPT built
    with bias=False gets zero biases (the same function)."""
    own: dict[str, torch.Tensor] = dict(model.named_parameters())
    state = own if state is None else state
    missing = sorted(set(own) - set(state))
    if missing:
        raise ExportError(f"exported state is missing parameter {missing[0]!r}")
    out: dict[str, torch.Tensor] = {}
    names: dict[str, tuple[str, bool]] = {}
    for name, t in state.items():
        if name not in own:
            raise ExportError(f"exported state has tensor {name!r}, which the GPT does not")
        if name == "lm_head.weight":
            new, transposed = "lm_head.weight", False
        else:
            parts = name.split(".")
            transposed = len(parts) == 5 and parts[2] in ("attn", "mlp") and parts[-1] == "weight"
            new = "transformer." + name
        out[new] = t.detach().T.contiguous() if transposed else t.detach()
        names[name] = (new, transposed)
    cfg = _as_gpt(model).config
    if not cfg.bias:  # GPT-2 always has biases: zeros compute the same function
        for i in range(cfg.n_layer):
            for sub, width in (("ln_1", cfg.n_embd), ("ln_2", cfg.n_embd), ("attn.c_attn", 3 * cfg.n_embd),
                               ("attn.c_proj", cfg.n_embd), ("mlp.c_fc", 4 * cfg.n_embd), ("mlp.c_proj", cfg.n_embd)):
                out[f"transformer.h.{i}.{sub}.bias"] = torch.zeros(width, dtype=out["transformer.wte.weight"].dtype)
        out["transformer.ln_f.bias"] = torch.zeros(cfg.n_embd, dtype=out["transformer.wte.weight"].dtype)
    return out, names


def export_gpt_as_hf_directory(
    model: nn.Module,
    out_dir: str | Path,
    state: dict[str, torch.Tensor] | None = None,
    sparsity_info: dict[str, dict] | None = None,
    sparsity_meta: dict | None = None,
) -> Path:
    """Write the built-in GPT as a transformers GPT-2 directory (GPT2LMHeadModel, same logits)
    with the byte tokenizer as HF tokenizer files, so AutoModelForCausalLM and AutoTokenizer
    load it. sparsity_info uses built-in names and dims; sparsity.json gets GPT-2 names and
    dims (a transposed weight's input axis becomes 0)."""
    from transformers import GPT2LMHeadModel

    from models.hf_tokenizer import save_byte_tokenizer_as_hf

    hf_state, names = gpt_state_to_gpt2(model, state)
    with torch.device("meta"):  # only names, shapes and config are needed from it
        hf_model = GPT2LMHeadModel(gpt_to_gpt2_config(model.config))
    hf_info = None
    if sparsity_info:
        hf_info = {}
        for name, claim in sparsity_info.items():
            if name not in names:
                raise ExportError(f"sparsity info names tensor {name!r}, which is not in the exported weights")
            new, transposed = names[name]
            entry = normalize_claim(claim)
            if transposed and "dim" in entry:
                entry["dim"] = 1 - int(entry["dim"])
            hf_info[new] = entry
    out = export_hf_directory(hf_model, None, out_dir, state=hf_state, sparsity_info=hf_info, sparsity_meta=sparsity_meta)
    save_byte_tokenizer_as_hf(out)
    return out
