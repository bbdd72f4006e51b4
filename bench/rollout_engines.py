"""Rollout engines side by side: our KV-cache loop (rollout.engine=torch) and vLLM (vllm).

    python -m bench.rollout_engines [--quick] [--out FILE]     # default bench/results/rollout_engines.json

- results: tokens/s of each engine generating for 64 prompts of 16 random token ids, 128 new
  tokens each (temperature 1, stop at eos as in rollouts: tokens counted are the ones generated),
  bf16 weights, one thread (as a rollout worker runs: rollout.num_threads=1; vLLM sets one
  thread for itself anyway), after one warm-up call, median of 3. Random-init Llama models of
  several sizes (head size 64), byte vocabulary: quick ~3M and ~25M, full adds ~100M.
- rl: seconds per RL step of `python -m launch.rl model=hf` with each engine, the examples/arith
  dataset on its tiny Llama (make_data.py --tiny-hf), sync.mode=sparse: the step, its generation
  (rollout/gen_s, the slowest worker) and the weight sync (sync/seconds: publish + every worker
  committed and, for vLLM, the engine handed the changed tensors). Means over the steps after
  the first two.
- A PNG beside the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "rollout_engines.json"
BATCH, NEW_TOKENS, PROMPT_LEN, REPEATS = 64, 128, 16, 3
# name -> LlamaConfig fields (head size 64: a size vLLM's CPU attention supports)
SIZES = {
    "3M": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768),
    "25M": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1536),
    "100M": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=3072),
}


def save_llama(out_dir: Path, fields: dict) -> tuple[Path, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, max_position_embeddings=256, bos_token_id=256, eos_token_id=257,
                         pad_token_id=258, tie_word_embeddings=False, **fields)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir))
    return out_dir, sum(p.numel() for p in model.parameters())


def tokens_per_s(engine, prompts) -> tuple[float, list[float]]:
    from rollout.generation import SamplingConfig

    sampling = SamplingConfig(temperature=1.0, max_new_tokens=NEW_TOKENS)
    engine.generate(prompts, sampling)  # warm-up: kernels, primitives for these shapes
    rates = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        out = engine.generate(prompts, sampling)
        rates.append(float(out.lengths.sum()) / (time.perf_counter() - started))
    return statistics.median(rates), rates


def measure_engines(sizes: list[str], workdir: Path) -> list[dict]:
    import random

    import torch

    from models import ModelConfig, build_model
    from rollout.config import RolloutConfig, VLLMConfig
    from rollout.torch_engine import TorchEngine
    from rollout.vllm_engine import VLLMEngine

    torch.set_num_threads(1)
    rng = random.Random(0)
    prompts = [[256] + [rng.randrange(256) for _ in range(PROMPT_LEN - 1)] for _ in range(BATCH)]
    results = []
    for size in sizes:
        path, n_params = save_llama(workdir / size, SIZES[size])
        mc = ModelConfig(kind="hf", path=str(path))
        for engine_name in ("torch", "vllm"):
            engine: TorchEngine | VLLMEngine
            if engine_name == "torch":
                model, tok = build_model(mc)
                engine = TorchEngine(model, tok, device="cpu", dtype="bfloat16")
            else:
                engine = VLLMEngine(mc, RolloutConfig(engine="vllm", vllm=VLLMConfig(kv_cache_memory_bytes=1 << 30)), 0)
            rate, rates = tokens_per_s(engine, prompts)
            if isinstance(engine, VLLMEngine):
                engine.close()
            del engine
            results.append({"engine": engine_name, "model": size, "model_params": n_params, "batch": BATCH,
                            "new_tokens": NEW_TOKENS, "tokens_per_s": round(rate, 1),
                            "tokens_per_s_runs": [round(r, 1) for r in rates]})
            print(f"{size:>5} {engine_name:>5}: {rate:8.0f} tokens/s  ({', '.join(f'{r:.0f}' for r in rates)})",
                  flush=True)
    return results


def measure_rl(steps: int, workdir: Path) -> list[dict]:
    """One short `launch.rl model=hf` run per engine, each in its own process (and Ray)."""
    data = ROOT / "examples" / "arith"
    model_dir = workdir / "arith-llama"
    subprocess.run([sys.executable, str(data / "make_data.py"), "--out", str(workdir / "arith-data"),
                    "--tiny-hf", str(model_dir)], check=True, capture_output=True)
    from safetensors.torch import load_file

    n_params = sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())
    out = []
    for engine in ("torch", "vllm"):
        run_dir = workdir / f"rl-{engine}"
        cmd = [sys.executable, "-m", "launch.rl", "model=hf", f"model.path={model_dir}", f"rollout.engine={engine}",
               "task=dataset", f"task.path={data / 'train.parquet'}", f"task.reward_fns=[{data / 'reward.py'}:score]",
               f"rl.steps={steps}", "sync.mode=sparse", "logger=console", "rl.checkpoint_every=0",
               f"hydra.run.dir={run_dir}"]
        started = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
        rows = [json.loads(ln) for ln in (run_dir / "steps.jsonl").read_text().splitlines()][2:]
        mean = lambda k: round(statistics.fmean(r[k] for r in rows), 4)  # noqa: E731
        summary = json.loads((run_dir / "summary.json").read_text())
        out.append({"engine": engine, "model_params": n_params, "steps": steps, "step_s": mean("step_s"),
                    "gen_s": mean("rollout/gen_s"), "train_s": mean("train_s"), "sync_s": mean("sync/seconds"),
                    "logprob_diff_mean": summary.get("rollout.logprob_diff_mean"),
                    "wall_s": round(time.perf_counter() - started, 1)})
        print(f"rl {engine:>5}: step {out[-1]['step_s']:.3f} s (gen {out[-1]['gen_s']:.3f}, train "
              f"{out[-1]['train_s']:.3f}, sync {out[-1]['sync_s']:.3f}), logprob diff "
              f"{out[-1]['logprob_diff_mean']}", flush=True)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    sizes = list(dict.fromkeys(r["model"] for r in report["results"]))
    for k, engine in enumerate(("torch", "vllm")):
        rates = [next(r["tokens_per_s"] for r in report["results"] if r["model"] == s and r["engine"] == engine)
                 for s in sizes]
        a.bar([i + 0.4 * k for i in range(len(sizes))], rates, width=0.4, label=engine)
    a.set_xticks([i + 0.2 for i in range(len(sizes))], [f"Llama {s}" for s in sizes])
    a.set_ylabel("generated tokens / s")
    a.set_title(f"batch {BATCH}, {NEW_TOKENS} new tokens, bf16, 1 thread")
    a.legend()
    if report["rl"]:
        engines = [r["engine"] for r in report["rl"]]
        bottom = [0.0] * len(engines)
        for key in ("gen_s", "train_s", "sync_s"):
            vals = [r[key] for r in report["rl"]]
            b.bar(engines, vals, bottom=bottom, label=key.removesuffix("_s"))
            bottom = [x + y for x, y in zip(bottom, vals)]
        b.set_ylabel("seconds per RL step")
        b.set_title("launch.rl model=hf (arith, tiny Llama), sync.mode=sparse")
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~3M and ~25M models, 12 RL steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    from launch.env import set_runtime_defaults

    set_runtime_defaults()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sizes = ["3M", "25M"] if args.quick else ["3M", "25M", "100M"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "quick": args.quick,
                  "results": measure_engines(sizes, work), "rl": measure_rl(12 if args.quick else 30, work)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    plot(report, png)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
