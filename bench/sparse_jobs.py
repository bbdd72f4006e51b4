"""The sparse-training methods as a user runs them: the pretraining jobs of SCL, Sparse-IFT and
N:M in the backward pass, with their exported weights re-read and checked.

    python -m bench.sparse_jobs [--jobs NAME,...] [--reuse] [--out bench/results/sparse_jobs.json]

Each job is `python -m launch.pretrain <overrides>` exactly as written in JOBS (the default
gpt_small, 2 ranks, 500 steps unless the overrides say otherwise), in its own run directory under
`--runs`. Afterwards the exported `model.safetensors` is read again, the targeted tensors are the
ones the run's `sparsity.json` names, and the checks below are computed from the weights, not from
the run's own metrics; eval loss and `model.flops_per_token` / `model.params_total` come from the
run's summary.json. `--reuse` skips a job whose run directory already has a summary.json (to
re-check without retraining). Output: JSON with every job's numbers and each check's value,
limit and pass; exit 1 when a check fails. About 5 minutes per job on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

JOBS: dict[str, list[str]] = {
    "dense": [],
    "rigl_300": ["sparsity=rigl", "sparsity.density=0.2", "trainer.max_steps=300"],
    "scl_300": ["sparsity=scl", "sparsity.density=0.2", "trainer.max_steps=300"],
    "ift_wide": ["sparse_ift=wide", "sparse_ift.sparsity=0.75", "sparsity=rigl"],
    "nm_transposable": ["sparsity=nm", "sparsity.backward=transposable"],
    "nm_2_8_exact": ["sparsity=nm", "sparsity.n=2", "sparsity.m=8", "sparsity.backward=exact"],
    "nm_2_8_bidirectional": ["sparsity=nm", "sparsity.n=2", "sparsity.m=8", "sparsity.backward=bidirectional"],
}


def run_job(name: str, overrides: list[str], run_dir: Path, reuse: bool, log) -> float | None:
    """Runs one job into run_dir; its wall seconds (None when reused)."""
    if reuse and (run_dir / "summary.json").exists():
        log(f"{name}: reusing {run_dir}")
        return None
    cmd = [sys.executable, "-m", "launch.pretrain", *overrides, f"hydra.run.dir={run_dir}"]
    log(f"{name}: {' '.join(cmd[1:])}")
    start = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return time.time() - start


def exported_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The exported tensors, read from disk, and the names of the targeted (sparsified) ones."""
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "model.safetensors"))
    described = run_dir / "sparsity.json"  # written by every sparse export; a dense one has none
    targeted = list(json.loads(described.read_text())["tensors"]) if described.exists() else []
    missing = [t for t in targeted if t not in weights]
    if missing:
        raise KeyError(f"{run_dir}: sparsity.json names tensors the export lacks: {missing[:3]}")
    return weights, targeted


def layer_sparsity(weights: dict[str, torch.Tensor], names: list[str]) -> dict[str, float]:
    return {n: float((weights[n] == 0).float().mean()) for n in names}


def nm_report(weights: dict[str, torch.Tensor], names: list[str], n: int, m: int) -> dict:
    """Groups breaking N:M along each dimension of the [out, in] weights (dim 1 = input)."""
    from models.nm_pattern import nm_violations

    def violations(dim: int) -> int:
        return sum(nm_violations(weights[t], n, m, dim) for t in names)

    return {"pattern": f"{n}:{m}", "tensors": len(names), "input_dim_violations": violations(1),
            "output_dim_violations": violations(0)}


def measure(name: str, run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    weights, targeted = exported_weights(run_dir)
    out: dict = {"run_dir": str(run_dir), "eval_loss": summary["eval/loss_final"], "steps": summary["steps"],
                 "flops_per_token": summary["model.flops_per_token"], "params_total": summary["model.params_total"],
                 "wall_s": summary["wall_s"], "targeted_tensors": len(targeted)}
    if targeted:
        per_layer = layer_sparsity(weights, targeted)
        zeros = sum(per_layer[t] * weights[t].numel() for t in targeted)
        out["sparsity_overall"] = zeros / sum(weights[t].numel() for t in targeted)
        out["sparsity_per_layer"] = per_layer
        out["density_spread"] = max(per_layer.values()) - min(per_layer.values())
    if name.startswith("nm_"):
        n, m = (2, 8) if "2_8" in name else (2, 4)
        out["nm"] = nm_report(weights, targeted, n, m)
    if "backward_density" in summary or "sparsity/backward_density" in summary:
        out["backward_density"] = summary.get("sparsity/backward_density")
    return out


def bar_checks(r: dict) -> dict:
    checks: dict[str, tuple[float, float, float]] = {}  # label -> (value, low, high)
    if "scl_300" in r:
        scl = r["scl_300"]
        checks["SCL overall sparsity 0.8 +- 0.03"] = (scl["sparsity_overall"], 0.77, 0.83)
        checks["SCL per-layer density spread >= 0.05"] = (scl["density_spread"], 0.05, float("inf"))
        if "rigl_300" in r:
            checks["SCL eval loss <= 1.10 x RigL (300 steps)"] = (
                scl["eval_loss"], 0.0, 1.10 * r["rigl_300"]["eval_loss"])
    if "ift_wide" in r:
        wide = r["ift_wide"]
        if "dense" in r:
            dense = r["dense"]
            checks["Sparse-IFT wide FLOPs/token within 3 % of dense"] = (
                wide["flops_per_token"] / dense["flops_per_token"], 0.97, 1.03)
            checks["Sparse-IFT wide params > dense"] = (
                wide["params_total"] / dense["params_total"], 1.0 + 1e-12, float("inf"))
        per_layer = wide["sparsity_per_layer"].values()
        checks["Sparse-IFT wide: least sparse layer >= 0.74"] = (min(per_layer), 0.74, 1.0)
        checks["Sparse-IFT wide: most sparse layer <= 0.76"] = (max(per_layer), 0.0, 0.76)
    if "nm_transposable" in r:
        nm = r["nm_transposable"]["nm"]
        checks["transposable: 2:4 violations along input dim"] = (nm["input_dim_violations"], 0, 0)
        checks["transposable: 2:4 violations along output dim"] = (nm["output_dim_violations"], 0, 0)
    if "nm_2_8_bidirectional" in r:
        bi = r["nm_2_8_bidirectional"]
        checks["2:8 bidirectional: violations along input dim"] = (bi["nm"]["input_dim_violations"], 0, 0)
        if "nm_2_8_exact" in r:
            checks["2:8 bidirectional eval loss within 5 % of exact"] = (
                bi["eval_loss"] / r["nm_2_8_exact"]["eval_loss"], 0.95, 1.05)
    return {label: {"value": v, "low": lo, "high": hi, "pass": bool(lo <= v <= hi)}
            for label, (v, lo, hi) in checks.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sparse_jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated subset of {list(JOBS)}")
    parser.add_argument("--runs", default="outputs/sparse_jobs", help="parent of the jobs' run directories")
    parser.add_argument("--reuse", action="store_true", help="keep a job's earlier run when it has a summary.json")
    parser.add_argument("--out", default=str(RESULTS / "sparse_jobs.json"))
    args = parser.parse_args(argv)
    names = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = [j for j in names if j not in JOBS]
    if unknown:
        parser.error(f"unknown jobs {unknown}; known: {list(JOBS)}")

    def log(msg: str) -> None:
        print(msg, flush=True)

    results, ran_s = {}, {}
    for name in names:
        run_dir = Path(args.runs).resolve() / name
        ran_s[name] = run_job(name, JOBS[name], run_dir, args.reuse, log)
        results[name] = measure(name, run_dir)
        log(f"{name}: eval loss {results[name]['eval_loss']:.4f}"
            + (f", targeted sparsity {results[name]['sparsity_overall']:.4f}" if "sparsity_overall" in results[name] else ""))
    bar = bar_checks(results)
    out = {"commands": {n: ["python", "-m", "launch.pretrain", *JOBS[n]] for n in names}, "job_wall_s": ran_s,
           "jobs": results, "bar": bar}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for label, c in bar.items():
        log(f"- {label}: {c['value']:.4g} in [{c['low']:.4g}, {c['high']:.4g}]: {'pass' if c['pass'] else 'FAIL'}")
    log(f"wrote {args.out}")
    return 0 if all(c["pass"] for c in bar.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
