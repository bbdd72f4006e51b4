"""Sync vs async RL: step time of the same job in both modes, in one run of this script.

    python -m bench.rl_async [--steps 60] [--sft-steps 100] [--out bench/results/rl_async.json]
                             [override ...]   (extra Hydra overrides for both runs)

Both runs use the same config (the RL demo's, shortened) and the same Ray instance, started
once here; each mode's step time is the mean over its RL steps after the first 5 (which include
the first deltas and the async pipeline filling up). Reported per mode: step_s_mean,
gen_wait_s_mean (the driver waiting for rollouts), train_s_mean, sync_s_mean, sync.pause_s_mean
(async: the swap that pauses generation), staleness, reward windows, sync ratio; and the
async/sync speedup of the step time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from launch.env import set_runtime_defaults

RESULTS = Path(__file__).resolve().parent / "results"


def run_mode(mode: str, steps: int, sft_steps: int, extra: list[str]) -> dict:
    from launch.rl import run_rl
    from launch.rl_config import compose_rl_config

    cfg = compose_rl_config([f"rl.mode={mode}", f"rl.steps={steps}", f"rl.sft_warmup_steps={sft_steps}",
                             "logger=console", "logger.console=false", "rl.export=false", f"rl.log_every={max(1, steps)}", *extra])
    with tempfile.TemporaryDirectory() as d:
        started = time.time()
        metrics = run_rl(cfg, d)
        wall = time.time() - started
        history = _steps(Path(d) / "steps.jsonl")
    skip = 5
    out = {"wall_s": wall, **{k: metrics.get(k) for k in (
        "reward.first_10pct", "reward.last_10pct", "sync.ratio", "sync.pause_s_mean", "staleness.mean",
        "sync.checksum_mismatches", "trainer.final_version", "rollout.final_versions", "rl_s")}}
    for key in ("step_s", "gen_wait_s", "train_s", "sync/seconds"):
        values = history.get(key, [])[skip:]
        out[key.replace("/", "_") + "_mean"] = sum(values) / len(values) if values else None
    return out


def _steps(path: Path) -> dict[str, list[float]]:
    history: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        for k, v in json.loads(line).items():
            history.setdefault(k, []).append(v)
    return history


def main() -> None:
    set_runtime_defaults()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sft-steps", type=int, default=100)
    p.add_argument("--out", default=str(RESULTS / "rl_async.json"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        results = {mode: run_mode(mode, a.steps, a.sft_steps, a.overrides) for mode in ("sync", "async")}
    finally:
        ray.shutdown()
    s, y = results["sync"]["step_s_mean"], results["async"]["step_s_mean"]
    report = {
        "bench": "rl_async", "steps": a.steps, "sft_steps": a.sft_steps, "overrides": a.overrides,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
        "async_speedup": (s / y) if s and y else None,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
