"""Benchmark of a Hugging Face causal LM in both jobs' hot paths, on this machine.

    python -m bench.hf [--out FILE] [--model DIR] [--quick]

Model: a tiny random-init Llama-style model (grouped-query attention, SwiGLU, untied lm_head;
tests/hf_fixtures.py, with the fixtures' BPE tokenizer and chat template) saved with
save_pretrained into a temporary directory, or your own local HF directory with --model.
Everything runs in this process with one torch thread, as one trainer rank or one rollout
worker does in the jobs (trainer.num_threads=1, rollout.num_threads=1).

Reported (JSON, default bench/results/hf.json):
- rollout: tokens/s of RolloutWorker.generate through the rollout engine (TorchEngine: batched,
  KV cache, temperature 1.0 sampling) on the reverse task's prompts through the chat template,
  bf16 policy copy (the RL default) and fp32; generated tokens only (prompt prefill included in
  the time), median over repeats.
- train_step: TrainerWorker (DeepSpeed, world size 1, ZeRO 1, fp32) step time on the same
  batch of token windows, dense vs 2:4 SR-STE (conf/sparsity/nm.yaml); median over steps after
  warm-up steps, the two methods interleaved step by step so machine load hits both alike.
- sync: per-step payload ratio (dense bf16 bytes / payload bytes) of the sparse-delta codec
  at levels fast and best, publishing bf16 weights after every step of AdamW on fp32 masters
  at lr 1e-6 (constant, fresh optimizer), dense and 2:4; the first step is included.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "hf.json"
TINY_LLAMA = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 384}


def save_bench_llama(out_dir: Path) -> Path:
    """The tiny Llama-style model of the tests' fixtures, a little wider and deeper."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from hf_fixtures import save_tiny_llama

    return save_tiny_llama(out_dir, **TINY_LLAMA)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# -- rollout ---------------------------------------------------------------------------------------


def bench_rollout(model_cfg, dtype: str, batch: int, new_tokens: int, repeats: int) -> dict:
    from rollout.config import RolloutConfig
    from rollout.tasks import TaskConfig
    from rollout.worker import RolloutWorker
    from sync.codec import encode

    rcfg = RolloutConfig(workers=1, prompts_per_step=batch, samples_per_prompt=1, max_new_tokens=new_tokens,
                         temperature=1.0, dtype=dtype, num_threads=1)
    worker = RolloutWorker(0, model_cfg, rcfg, TaskConfig(name="reverse", length=6))
    # The engine's own weights as version 1 (generate refuses a worker with no version).
    own = {k: v.clone() for k, v in worker.engine.weights().items()}
    worker.slot.receiver.commit(worker.slot.receiver.stage_buckets([encode(None, own, base_version=None, target_version=1,
                                                                 level="fast")], kind="snapshot"))
    worker.generate(batch, 1)  # warm-up
    rates, seconds, tokens, prompt_len = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = worker.generate(batch, 1)
        dt = time.perf_counter() - t0
        n = int(out.lengths.sum())
        rates.append(n / dt)
        seconds.append(dt)
        tokens.append(n)
        prompt_len.append(statistics.mean(len(p) for p in out.prompt_ids))
    return {"dtype": dtype, "batch": batch, "max_new_tokens": new_tokens, "repeats": repeats,
            "tokens_per_s": statistics.median(rates), "tokens_per_s_all": rates,
            "generated_tokens_mean": statistics.mean(tokens), "prompt_tokens_mean": statistics.mean(prompt_len),
            "seconds_median": statistics.median(seconds)}


# -- trainer ---------------------------------------------------------------------------------------


def make_trainer(model_cfg, sparsity: str, lr: float, steps: int, micro: int, seq_len: int):
    from trainer.config import OptimizerConfig, TrainerConfig
    from trainer.distributed import free_port
    from trainer.sparsity import SparsityConfig
    from trainer.worker import TrainerWorker

    scfg = SparsityConfig(method="nm", n=2, m=4, estimator="sr_ste") if sparsity == "nm" else SparsityConfig(method="dense")
    tcfg = TrainerConfig(device="cpu", precision="fp32", zero_stage=1, micro_batch_size=micro, seq_len=seq_len,
                         max_steps=steps, num_threads=1)
    ocfg = OptimizerConfig(lr=lr, min_lr=lr, warmup_steps=0, weight_decay=0.0)
    worker = TrainerWorker(model_cfg, tcfg, ocfg, scfg)
    worker.setup("127.0.0.1", free_port())
    return worker


def token_batches(vocab: int, count: int, micro: int, seq_len: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(3, vocab, (micro, seq_len + 1))} for _ in range(count)]


def bench_train_steps(model_cfg, micro: int, seq_len: int, warmup: int, steps: int) -> dict:
    """Dense and 2:4 SR-STE trainers, stepped alternately on the same batches. All trainers of
    this benchmark share the process's one (world size 1) process group, destroyed at the end:
    DeepSpeed caches its groups, so it cannot be torn down and re-created in between."""
    workers = {m: make_trainer(model_cfg, m, 1e-3, warmup + steps, micro, seq_len) for m in ("dense", "nm")}
    batches = token_batches(workers["dense"].tokenizer.vocab_size, warmup + steps, micro, seq_len)
    times: dict[str, list[float]] = {m: [] for m in workers}
    for i, batch in enumerate(batches):
        for m, w in workers.items():
            t0 = time.perf_counter()
            w.train_step(batch)
            if i >= warmup:
                times[m].append(time.perf_counter() - t0)
    dense, nm = statistics.median(times["dense"]), statistics.median(times["nm"])
    return {"micro_batch_size": micro, "seq_len": seq_len, "tokens_per_step": micro * seq_len,
            "warmup_steps": warmup, "timed_steps": steps,
            "dense_step_s": dense, "nm_2_4_step_s": nm, "nm_over_dense": nm / dense,
            "dense_step_s_all": times["dense"], "nm_2_4_step_s_all": times["nm"]}


# -- sync ------------------------------------------------------------------------------------------


def bench_sync(model_cfg, sparsity: str, steps: int, micro: int, seq_len: int) -> dict:
    from sync.codec import encode

    worker = make_trainer(model_cfg, sparsity, 1e-6, steps + 1, micro, seq_len)
    batches = token_batches(worker.tokenizer.vocab_size, steps, micro, seq_len, seed=1)
    old = worker.published_state("bfloat16")
    dense_bytes = sum(t.numel() * t.element_size() for t in old.values())
    rows = []
    for step, batch in enumerate(batches, 1):
        worker.train_step(batch)
        new = worker.published_state("bfloat16")
        changed = sum(int((new[k].view(torch.int16) != old[k].view(torch.int16)).sum()) for k in new)
        row = {"step": step, "changed_fraction": changed / sum(t.numel() for t in new.values())}
        for level in ("fast", "best"):
            t0 = time.perf_counter()
            payload = sum(len(b) for b in encode(old, new, base_version=step - 1, target_version=step, level=level))
            row[f"{level}_payload_bytes"] = payload
            row[f"{level}_ratio"] = dense_bytes / payload
            row[f"{level}_encode_s"] = time.perf_counter() - t0
        rows.append(row)
        old = new
    out = {"sparsity": "2:4 SR-STE" if sparsity == "nm" else "dense", "lr": 1e-6, "master_dtype": "float32",
           "published_dtype": "bfloat16", "dense_bytes": dense_bytes, "steps": rows}
    for level in ("fast", "best"):
        ratios = [r[f"{level}_ratio"] for r in rows]
        out[f"{level}_ratio_median"] = statistics.median(ratios)
        out[f"{level}_ratio_first_step"] = ratios[0]
    return out


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file to write")
    parser.add_argument("--model", default=None, help="a local HF causal LM directory (default: a tiny Llama)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps (smoke run)")
    args = parser.parse_args(argv)

    from launch.env import set_runtime_defaults

    set_runtime_defaults()
    _quiet_transformers()
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    from models import ModelConfig
    from models.hf import load_hf_skeleton

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else save_bench_llama(Path(tmp) / "llama")
        model_cfg = ModelConfig(kind="hf", path=str(path))
        skeleton, tok = load_hf_skeleton(model_cfg)
        q = args.quick
        started = time.perf_counter()
        result: dict[str, Any] = {
            "model": {"path": str(args.model) if args.model else "tiny Llama-style (tests/hf_fixtures.py)",
                      "architecture": type(skeleton).__name__,
                      "config": {k: getattr(skeleton.config, k, None) for k in
                                 ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                  "intermediate_size", "vocab_size", "tie_word_embeddings")},
                      "parameters": sum(p.numel() for p in skeleton.parameters()),
                      "tokenizer_vocab": tok.vocab_size},
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": 1, "platform": platform.platform(),
                        "torch": torch.__version__, "load_avg_start": os.getloadavg()},
            "rollout": [bench_rollout(model_cfg, dtype, 32, 32, 2 if q else 9) for dtype in ("bfloat16", "float32")],
            "train_step": bench_train_steps(model_cfg, micro=8, seq_len=128, warmup=2, steps=3 if q else 20),
            "sync": [bench_sync(model_cfg, s, 3 if q else 6, 8, 128) for s in ("dense", "nm")],
        }
        result["machine"]["load_avg_end"] = os.getloadavg()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        result["wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(summary_lines(result))
    print(f"wrote {out}")
    return result


def summary_lines(r: dict) -> str:
    lines = [f"model {r['model']['architecture']} {r['model']['parameters'] / 1e6:.2f} M parameters"]
    for x in r["rollout"]:
        lines.append(f"rollout {x['dtype']}: {x['tokens_per_s']:.0f} tokens/s (batch {x['batch']}, "
                     f"{x['generated_tokens_mean'] / x['batch']:.1f} new tokens/row, prompt {x['prompt_tokens_mean']:.0f})")
    t = r["train_step"]
    lines.append(f"train step ({t['tokens_per_step']} tokens): dense {t['dense_step_s'] * 1e3:.1f} ms, "
                 f"2:4 SR-STE {t['nm_2_4_step_s'] * 1e3:.1f} ms (x{t['nm_over_dense']:.2f})")
    for s in r["sync"]:
        lines.append(f"sync lr 1e-6 {s['sparsity']}: ratio fast {s['fast_ratio_median']:.0f}x, best "
                     f"{s['best_ratio_median']:.0f}x per step (median; first step fast {s['fast_ratio_first_step']:.0f}x, "
                     f"best {s['best_ratio_first_step']:.0f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
