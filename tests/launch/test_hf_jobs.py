"""Hugging Face causal LMs through both jobs (issue 7), in-process on the shared two-node Ray
cluster: sparse pretraining (2:4 SR-STE) and sparse RL fine-tuning with two rollout workers, on a
tiny Llama-style model (grouped-query attention, untied lm_head, nn.Linear) and a GPT-2 style one
(tied embeddings, Conv1D projections). Each run's exported directory must load with
AutoModelForCausalLM, generate, and hold exactly 2:4 weights in every decoder-layer projection.
(All four runs take ~1 min together on the 2-core box.)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from cluster_nodes import HEAD_NODE, SECOND_NODE
import torch

from hf_fixtures import save_tiny_gpt2, save_tiny_llama

pytestmark = pytest.mark.ray

QUIET = ["logger=console", "logger.console=false"]
# Projections inside decoder layers, by architecture, and the axis of their weight that runs over
# input features (nn.Linear: [out, in]; transformers' Conv1D: [in, out]): written out here, not
# taken from the code under test.
LAYER_PROJECTIONS = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
LAYER_PREFIX = {"llama": "model.layers", "gpt2": "transformer.h"}
INPUT_AXIS = {"llama": 1, "gpt2": 0}
N_LAYERS = 2  # hf_fixtures default


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_models")
    return {"llama": save_tiny_llama(root / "llama"), "gpt2": save_tiny_gpt2(root / "gpt2")}


def sparsified_names(arch: str) -> list[str]:
    return [f"{LAYER_PREFIX[arch]}.{i}.{p}.weight" for i in range(N_LAYERS) for p in LAYER_PROJECTIONS[arch]]


def assert_exactly_2_of_4(w: torch.Tensor, axis: int, name: str) -> None:
    """At most 2 nonzeros in every group of 4 along the input axis, and (pruned entries exactly 0,
    kept ones trained) practically every group holding exactly 2."""
    groups = (w != 0).movedim(axis, -1).reshape(-1, 4).sum(-1)
    assert int(groups.max()) <= 2, name
    assert (groups == 2).float().mean() > 0.99, name


def check_exported_directory(out: Path, arch: str, source: Path) -> None:
    """Loads with AutoModelForCausalLM (local only), generates, and is exactly 2:4 where claimed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    original = AutoModelForCausalLM.from_pretrained(str(source), local_files_only=True)
    params = dict(model.named_parameters())
    claims = json.loads((out / "sparsity.json").read_text())["tensors"]
    assert sorted(claims) == sorted(sparsified_names(arch))
    for name in sparsified_names(arch):
        assert claims[name]["pattern"] == "2:4" and claims[name]["dim"] == INPUT_AXIS[arch]
        assert_exactly_2_of_4(params[name], INPUT_AXIS[arch], name)
    # Everything else stays dense (embeddings, norms, lm_head), and training changed the weights.
    for name, p in params.items():
        if name not in claims and p.dim() == 2:
            assert (p != 0).float().mean() > 0.99, name
    emb = model.get_input_embeddings().weight
    assert not torch.equal(emb, original.get_input_embeddings().weight)
    tied = model.get_output_embeddings().weight is emb
    assert tied == (arch == "gpt2")
    ids = tok("the sparse model", return_tensors="pt")
    out_ids = model.generate(**ids, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    assert out_ids.shape[1] > ids["input_ids"].shape[1]
    assert torch.equal(out_ids[0, : ids["input_ids"].shape[1]], ids["input_ids"][0])


# -- sparse pretraining --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pretraining_hf_model_with_2_4_sr_ste_exports_an_hf_directory(arch, hf_dirs, ray_cluster, tmp_path):
    from launch.config import compose_pretrain_config
    from launch.pretrain import run_pretrain

    cfg = compose_pretrain_config([
        "model=hf", f"model.path={hf_dirs[arch]}", "sparsity=nm", "trainer.max_steps=4", "trainer.seq_len=32",
        "trainer.micro_batch_size=4", "trainer.eval_batches=1", "trainer.eval_every=0", "trainer.checkpoint_every=0",
        "data.max_bytes=60000", "optimizer.warmup_steps=1", "optimizer.lr=3e-3", "cluster.cpus_per_trainer=1",
        *QUIET,
    ])
    from trainer.sparsity import effective_estimator

    assert effective_estimator(cfg.sparsity) == "sr_ste" and (cfg.sparsity.n, cfg.sparsity.m) == (2, 4)
    summary = run_pretrain(cfg, tmp_path)
    assert summary["steps"] == 4 and summary["sparsity_method"] == "nm"
    assert summary["sparsity/density"] == pytest.approx(0.5)
    assert summary["eval/loss_final"] < summary["eval/loss_first"]
    check_exported_directory(tmp_path, arch, hf_dirs[arch])


# -- sparse RL fine-tuning -----------------------------------------------------------------------


def rl_config(path: Path, *overrides: str):
    from launch.rl_config import compose_rl_config

    return compose_rl_config([
        "model=hf", f"model.path={path}", "rollout.workers=2", "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=2", "rollout.max_new_tokens=4", "rl.sft_warmup_steps=1", "rl.log_every=1",
        "rl.lr_warmup_steps=0", "optimizer.lr=1e-3", *QUIET,
        f"+cluster.resources_per_trainer={{{HEAD_NODE}: 0.01}}", f"+rollout.resources={{{SECOND_NODE}: 0.01}}",
        *overrides,
    ])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rl_hf_model_2_4_two_workers_end_bit_identical_to_the_trainer(arch, hf_dirs, ray_cluster, tmp_path):
    import ray

    steps = 2
    seen = {}

    def at_last_step(step, job):
        if step != steps:
            return
        # Sync mode: after the step the trainer has published and every worker applied it.
        seen["published"] = ray.get(job.trainers.workers[0].published_state.remote("bfloat16"))
        seen["workers"] = [ray.get(w.weights.remote()) for w in job.rollouts.workers]

    run_dir = tmp_path / "run"
    summary = run_rl_job(rl_config(hf_dirs[arch], "sparsity=nm", f"rl.steps={steps}"), run_dir, at_last_step)
    assert summary["sparsity_method"] == "nm" and summary["rl_steps"] == steps
    assert summary["trainer.final_version"] == 1 + steps  # the SFT warm-up step counts as a version
    assert summary["rollout.final_versions"] == [1 + steps] * 2
    assert summary["sync.checksum_mismatches"] == 0
    assert 0 < summary["sync.payload_bytes"] < summary["sync.dense_bytes"]

    published = seen["published"]
    if arch == "gpt2":  # tied weights are published once, under the name transformers keeps
        assert "transformer.wte.weight" in published and "lm_head.weight" not in published
    assert all(t.dtype == torch.bfloat16 for t in published.values())
    for k, state in enumerate(seen["workers"]):
        assert sorted(state) == sorted(published), k
        for name, t in published.items():
            assert torch.equal(state[name].view(torch.int16), t.view(torch.int16)), (k, name)  # bit for bit
    for name in sparsified_names(arch):
        assert_exactly_2_of_4(published[name], INPUT_AXIS[arch], name)
    check_exported_directory(run_dir, arch, hf_dirs[arch])  # the job's export (rl.export, default true)
    # The export holds the trainer's final masters: rounded to bf16 they are what was published.
    from safetensors.torch import load_file

    exported = load_file(str(run_dir / "model.safetensors"))
    for name, t in published.items():
        assert torch.equal(exported[name].to(torch.bfloat16), t), name


def test_rl_hf_model_2_4_with_squarehead_distillation_logs_the_term(hf_dirs, ray_cluster, tmp_path):
    """Issue 12 in RL: a 2:4-pruned policy trained with policy loss + distill.weight * SquareHead
    to its dense starting model (model.path)."""
    steps = 3
    run_dir = tmp_path / "run"
    cfg = rl_config(hf_dirs["llama"], "sparsity=nm", "distill=squarehead", "distill.weight=0.5",
                    "distill.teacher_dtype=float32", f"rl.steps={steps}", "rl.export=false")
    summary = run_rl_job(cfg, run_dir, None)
    assert summary["distill"] == "squarehead" and summary["rl_steps"] == steps
    assert summary["rollout.final_versions"] == [1 + steps] * 2 and summary["sync.checksum_mismatches"] == 0
    rows = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert len(rows) == steps
    for r in rows:  # one rank, one micro batch: the logged parts add up to the trained loss
        assert 0 < r["distill/squarehead"] < float("inf")  # pruned to 2:4: away from the dense teacher
        assert r["distill/total_loss"] == pytest.approx(r["train/loss"] + 0.5 * r["distill/squarehead"], rel=1e-5)


def run_rl_job(cfg, run_dir: Path, on_step):
    from launch.rl import run_rl

    run_dir.mkdir(parents=True, exist_ok=True)
    return run_rl(cfg, run_dir, on_step=on_step)


# -- bad input: a clear error naming the thing, before Ray or any actor starts ----------------------


@pytest.mark.parametrize("job", ["pretrain", "rl"])
@pytest.mark.parametrize("arch, overrides, error, message", [
    ("llama", ["model.path={missing}"], "ModelConfigError", "does not exist"),
    ("llama", ["sparsity=nm", "sparsity.include=[*.no_such_proj]"], "SparsityConfigError", r"'\*\.no_such_proj' matches no"),
    # q_proj's weight is [out=64, in=64]; Conv1D c_attn's is [in=64, out=192]: M=3 divides 192, not 64.
    ("llama", ["sparsity=nm", "sparsity.n=1", "sparsity.m=3"], "SparsityConfigError",
     r"model\.layers\.0\.self_attn\.q_proj: M=3 does not divide the layer's input dimension 64"),
    ("gpt2", ["sparsity=nm", "sparsity.n=1", "sparsity.m=3"], "SparsityConfigError",
     r"transformer\.h\.0\.attn\.c_attn: M=3 does not divide the layer's input dimension 64"),
])
def test_bad_input_fails_before_ray_starts(job, arch, overrides, error, message, hf_dirs, tmp_path, monkeypatch):
    import launch.cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the bad input was caught")

    monkeypatch.setattr(launch.cluster, "ray_cluster", no_ray)
    overrides = [o.format(missing=tmp_path / "nope") for o in overrides]
    if job == "pretrain":
        from launch.config import compose_pretrain_config as compose
        from launch.pretrain import run_pretrain as run
    else:
        from launch.rl import run_rl as run
        from launch.rl_config import compose_rl_config as compose
    cfg = compose(["model=hf", f"model.path={hf_dirs[arch]}", *QUIET, *overrides])
    with pytest.raises(Exception, match=message) as caught:
        run(cfg, tmp_path / "run")
    assert type(caught.value).__name__ == error
