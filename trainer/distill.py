"""Distillation from the frozen dense starting model: the sparse fine-tuning recipe of Kurtic et
al. 2023 ("Sparse Finetuning for Inference Acceleration of Large Language Models").

    distill=squarehead    loss = task_weight * CE + weight * SquareHead
    distill=kl            loss = task_weight * CE + weight * T^2 KL(teacher || student) per token
    distill=none          the plain language-modelling objective

SquareHead (the paper's feature loss): over the decoder layers' outputs h_l (the model's
`hidden_states[1:]`, the embeddings excluded),

    L_feat = sum_l MSE(h_l^teacher, h_l^student) / MSE(h_l^teacher, 0)

so every layer counts alike whatever its activation scale. Defaults follow the authors' scripts
(IST-DASLab/SparseFinetuning: hardness_ce = 1, hardness_squarehead = 1, hardness_kldiv = 0,
temperature 1): task_weight = 1, weight = 1. The KL form is the same scripts' `kldiv_loss`
(sum over tokens of KL(teacher || student) at temperature T, times T^2, over the token count).

The teacher is the job's dense starting model (model.path, or distill.teacher_path with the same
architecture), loaded on the trainer rank the first time the objective runs, frozen, in
`distill.teacher_dtype` (bf16 by default: a half-size copy). It is never pickled: Ray ships the
objective without it. In eval mode the objective is the plain task loss, so eval/loss stays
comparable across runs with and without distillation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.objectives import LanguageModelingObjective

DISTILL_NAMES = ("none", "squarehead", "kl")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
# config.json fields the student and the teacher must share for each loss
MATCH_FIELDS = {
    "squarehead": ("model_type", "num_hidden_layers", "hidden_size", "vocab_size"),
    "kl": ("vocab_size",),
}


@dataclass
class DistillConfig:
    name: str = "none"  # none | squarehead | kl
    weight: float = 1.0  # weight of the distillation term (hardness_squarehead / hardness_kldiv)
    task_weight: float = 1.0  # weight of the next-token cross entropy (hardness_ce)
    temperature: float = 1.0  # kl only
    teacher_path: str | None = None  # null: the dense starting model, model.path
    teacher_dtype: str = "bfloat16"  # float32 | bfloat16 | float16


class DistillConfigError(ValueError):
    """A distill config that cannot work for this model; the message names the key."""


def exposes_hidden_states(model: torch.nn.Module) -> bool:
    """Whether `model(input_ids, output_hidden_states=True)` returns per-layer hidden states
    (Hugging Face causal LMs do; the built-in GPT returns logits only)."""
    config = getattr(model, "config", None)  # transformers' PretrainedConfig carries both
    return hasattr(config, "output_hidden_states") and hasattr(config, "num_hidden_layers")


def validate_distill_config(cfg: DistillConfig, model_cfg, student: torch.nn.Module | None = None) -> None:
    """Raise DistillConfigError naming the key, before any actor starts. `student`: the model
    skeleton (meta device is fine) the job trains."""
    if cfg.name not in DISTILL_NAMES:
        raise DistillConfigError(f"distill.name={cfg.name!r}; expected one of {list(DISTILL_NAMES)}")
    if cfg.name == "none":
        return
    for key in ("weight", "task_weight"):
        value = getattr(cfg, key)
        if not (value >= 0 and value < float("inf")):
            raise DistillConfigError(f"distill.{key}={value!r}; expected a finite value >= 0")
    if cfg.weight == 0:
        raise DistillConfigError(f"distill.weight=0 with distill={cfg.name}: use distill=none for no distillation")
    if not cfg.temperature > 0:
        raise DistillConfigError(f"distill.temperature={cfg.temperature!r}; expected > 0")
    if cfg.teacher_dtype not in TEACHER_DTYPES:
        raise DistillConfigError(f"distill.teacher_dtype={cfg.teacher_dtype!r}; expected one of {list(TEACHER_DTYPES)}")
    if model_cfg.kind != "hf":
        raise DistillConfigError(
            f"distill={cfg.name} distils from the pretrained dense model, but model.kind={model_cfg.kind!r} "
            f"starts from a random initialisation and does not expose hidden states; use model=hf"
        )
    if model_cfg.from_scratch and cfg.teacher_path is None:
        raise DistillConfigError(
            f"distill={cfg.name} with model.from_scratch=true has no pretrained starting model to distil from; "
            f"set distill.teacher_path to a pretrained checkpoint of the same architecture"
        )
    if cfg.name == "squarehead" and student is not None and not exposes_hidden_states(student):
        raise DistillConfigError(
            f"distill=squarehead needs the model's per-layer hidden states, but {type(student).__name__} "
            f"does not expose them (no output_hidden_states)"
        )
    if cfg.teacher_path is not None:
        from models.hf import check_hf_directory, load_hf_config

        try:
            teacher = load_hf_config(check_hf_directory(cfg.teacher_path))
        except Exception as e:
            raise DistillConfigError(f"distill.teacher_path={cfg.teacher_path!r}: {e}") from e
        student_config = load_hf_config(Path(model_cfg.path))
        for field in MATCH_FIELDS[cfg.name]:
            s, t = getattr(student_config, field, None), getattr(teacher, field, None)
            if s != t:
                raise DistillConfigError(
                    f"distill.teacher_path={cfg.teacher_path!r} does not match the student's architecture: "
                    f"{field} is {t!r} in the teacher, {s!r} in the student (model.path)"
                )


def load_teacher(cfg: DistillConfig, model_cfg, device: torch.device) -> torch.nn.Module:
    """The frozen teacher: distill.teacher_path, else the dense starting model (model.path), in
    distill.teacher_dtype on `device`, eval mode, no gradients."""
    from dataclasses import replace

    from models import build_model
    from models.hf import cast_parameters, torch_dtype

    # the teacher is a trained, untransformed checkpoint even when the student is built from scratch
    teacher_cfg = replace(model_cfg, path=cfg.teacher_path or model_cfg.path, dropout=0.0, dtype="float32",
                          from_scratch=False, sparse_ift="none", sparse_ift_sparsity=0.0)
    teacher, _ = build_model(teacher_cfg)
    teacher = cast_parameters(teacher, torch_dtype(cfg.teacher_dtype))
    return teacher.to(device).eval().requires_grad_(False)


def squarehead_loss(student: list[torch.Tensor] | tuple, teacher: list[torch.Tensor] | tuple) -> torch.Tensor:
    """sum_l MSE(t_l, s_l) / MSE(t_l, 0), in fp32."""
    if len(student) != len(teacher):
        raise ValueError(f"squarehead: {len(student)} student layers vs {len(teacher)} teacher layers")
    total: torch.Tensor | None = None
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float().detach()
        term = (s - t).pow(2).mean() / t.pow(2).mean().clamp(min=torch.finfo(torch.float32).tiny)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("squarehead: no layers to compare")
    return total


def kl_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * sum over tokens of KL(teacher || student) at temperature T, over the token count."""
    s = student_logits.float().reshape(-1, student_logits.shape[-1])
    t = teacher_logits.float().detach().reshape(-1, teacher_logits.shape[-1])
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  log_target=True, reduction="sum")
    return kl * temperature**2 / s.shape[0]


class DistillationObjective:
    """Objective (trainer/objectives.py protocol): task CE plus a distillation term."""

    def __init__(self, cfg: DistillConfig, model_cfg):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.teacher: torch.nn.Module | None = None
        self.task = LanguageModelingObjective()

    def __getstate__(self) -> dict:  # the teacher is loaded where the objective runs
        state = dict(self.__dict__)
        state["teacher"] = None
        return state

    def load_teacher(self, device: torch.device) -> torch.nn.Module:
        if self.teacher is None:
            self.teacher = load_teacher(self.cfg, self.model_cfg, device)
        return self.teacher

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if not model.training:
            return self.task(model, batch)
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        features = self.cfg.name == "squarehead"
        out = model(inputs, output_hidden_states=True) if features else model(inputs)
        logits = out.logits
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        teacher = self.load_teacher(logits.device)
        with torch.no_grad():
            t_out = teacher(inputs, output_hidden_states=True) if features else teacher(inputs)
        if features:
            distill = squarehead_loss(out.hidden_states[1:], t_out.hidden_states[1:])
        else:
            distill = kl_distill_loss(logits, t_out.logits, self.cfg.temperature)
        loss = self.cfg.task_weight * ce + self.cfg.weight * distill
        return loss, {"loss": ce.item(), f"distill/{self.cfg.name}": distill.item(),
                      "distill/total_loss": loss.item(), "sum/tokens": float(targets.numel())}


def build_objective(cfg: DistillConfig, model_cfg):
    """The job's objective: plain language modelling, or with distillation."""
    return LanguageModelingObjective() if cfg.name == "none" else DistillationObjective(cfg, model_cfg)
