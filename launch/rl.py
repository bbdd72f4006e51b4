"""RL fine-tuning job: `python -m launch.rl [hydra overrides]`; no overrides = the embedded demo.

The driver, top to bottom: check the config (before anything starts), start or join Ray, check
that trainers and rollout workers fit, build the trainer group (RLTrainerWorker ranks) and the
rollout group, warm the policy up by SFT on the task's answers, publish a first snapshot to every
worker, then loop over RL steps:

    sync mode:   generate (all workers) -> train one step -> publish -> every worker applies
    async mode:  workers generate batch s+1 with the weights they have while the trainer trains
                 on batch s; after the step the new version is offered to every worker, which
                 downloads and decodes it in the background and swaps it in before its next
                 batch. A sample older than rl.max_staleness versions is dropped and its worker
                 resynced (rl.max_staleness=0 makes async mode sync).

Every publish is a sparse delta (sync/), a full snapshot for a worker that is new or behind.

Fault tolerance: a dead rollout worker is replaced (launch/rl_rollouts.py). A dead trainer rank
(RayActorError from a trainer call) restarts the whole trainer group (launch/rl_trainers.py): the
new group loads the latest checkpoint (with rl.checkpoint_every > 0 one exists from RL step 0 on,
written right after the warm-up), the driver rolls its own state (step, reward history, task RNG)
back to it, the restored trainer publishes a full snapshot under a version above any published
before (versions never go backwards; rollout workers may be ahead of the checkpoint) and every
worker applies it. Samples in flight, made by versions the restored trainer never produced, are
dropped and counted (`rollout.dropped_lost_versions`); the steps after the checkpoint are redone.
Sync traffic totals keep counting what really crossed the wire. At most rl.max_trainer_restarts
restarts; a death during the warm-up, or with rl.checkpoint_every=0, ends the job (TrainerLost).
`run_rl(cfg, run_dir)` is the whole job, callable in-process with a Ray that is already running.
Outputs in run_dir: summary.json, steps.jsonl (every step's metrics), wandb/ (offline run), and
the final policy (model.safetensors + config.json, + sparsity.json when sparse).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

from launch.env import set_runtime_defaults

set_runtime_defaults()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from launch.rl_config import (  # noqa: E402
    RLConfigError, RLJobConfig, check_resources, derived_trainer_config, register_configs, rows_per_step,
    to_rl_config, validate_rl_config,
)


def run_rl(cfg: RLJobConfig, run_dir: str | Path, on_step=None) -> dict:
    """Run the job; returns the summary (also written to run_dir/summary.json).

    `on_step(step, rollouts)`, when given, is called after every RL step (tests use it to kill
    a rollout worker or the trainer mid-run)."""
    import ray
    import torch

    from launch.cluster import ray_cluster
    from launch.loggers import MetricsLogger
    from launch.rl_rollouts import RolloutGroup
    from launch.rl_trainers import RLTrainers
    from launch.trainer_group import merge_metrics
    from sync.errors import UpdateUnavailableError
    from models import build_model
    from rollout.batch import sft_batch
    from rollout.tasks import build_task
    from trainer import checkpoint as ckpt
    from trainer.algos.config import build_objective

    started = time.time()
    run_dir = Path(run_dir).resolve()
    validate_rl_config(cfg)
    rl, rc = cfg.rl, cfg.rollout
    trainer_cfg = derived_trainer_config(cfg)
    algo_cfg = replace(cfg.algo, temperature=rc.temperature)  # trainer logprobs = rollout logprobs
    advantage_fn = build_objective(algo_cfg)  # the driver's copy: advantages (PPO's baseline lives here)
    task, _ = build_task(cfg.task)
    with torch.device("meta"):
        _, tokenizer = build_model(cfg.model)
    rng = random.Random(trainer_cfg.seed)
    world = cfg.cluster.trainers
    rows = rows_per_step(cfg)
    if rl.sft_warmup_steps and any(p.answer is None for p in task.sample(64, random.Random(0))):
        raise RLConfigError("rl.sft_warmup_steps > 0 needs an answer for every prompt; "
                            "set rl.sft_warmup_steps=0 or add answers to task.prompts_file")

    ckpt_root = run_dir / "checkpoints"
    fingerprint = rl_fingerprint(cfg)
    resume_from = ckpt.find_resume_checkpoint(rl.resume, ckpt_root, key="rl.resume", error=RLConfigError)
    if resume_from is not None:  # checked before Ray starts
        ckpt.validate_checkpoint(resume_from, fingerprint)

    logger = MetricsLogger(cfg.logger, run_dir, config=asdict(cfg), total_steps=rl.steps)
    history: dict[str, list[float]] = {}
    totals = {"payload": 0, "dense": 0, "snapshot_payload": 0, "mismatches": 0, "discarded": 0,
              "dropped_lost": 0}
    done = 0  # RL steps already taken (a resumed run continues after them)
    try:
        with ray_cluster(cfg.cluster):
            check_resources(cfg, ray.cluster_resources())
            trainers = RLTrainers(cfg, trainer_cfg, algo_cfg)
            rollouts = None
            try:
                rollouts = RolloutGroup(cfg.model, rc, cfg.task, trainers.publisher)

                def restore(path: Path, keep_totals: bool) -> int:
                    """Load checkpoint `path` into the trainers and roll the driver back to it;
                    returns the weight version it was saved at."""
                    nonlocal done, history, totals
                    driver = trainers.group.load_checkpoint(str(path))["driver"]
                    done, history = driver["rl_step"], driver["history"]
                    if not keep_totals:
                        totals = {"dropped_lost": 0, **driver["totals"]}
                    rng.setstate(driver["rng"])
                    if driver.get("baseline") is not None:
                        advantage_fn.baseline = driver["baseline"]
                    steps_file = run_dir / "steps.jsonl"  # drop the rows written after the checkpoint
                    if steps_file.exists():
                        keep = [ln for ln in steps_file.read_text().splitlines() if json.loads(ln)["step"] <= done]
                        steps_file.write_text("".join(ln + "\n" for ln in keep))
                    return driver.get("version", 0)

                def start_rl(version_floor: int) -> dict:
                    """RL objective on every rank, publish under a version >= version_floor, and
                    bring every rollout worker to it (full snapshots); the publish stats."""
                    trainers.group.call("begin_rl", done)
                    trainers.group.call("set_version_floor", version_floor)
                    started_sync = time.perf_counter()
                    publish = trainers.begin_publish()
                    applied = rollouts.apply_all()
                    pub = trainers.finish_publish(publish, time.perf_counter() - started_sync)
                    for stats in applied:
                        totals["snapshot_payload"] += stats["payload_bytes"]
                        totals["mismatches"] += stats["checksum"] != pub["checksum"]
                    return pub

                def driver_state(step: int) -> dict:
                    return {"driver": {"rl_step": step, "history": history, "totals": totals, "rng": rng.getstate(),
                                       "baseline": getattr(advantage_fn, "baseline", None), "version": version}}

                # -- supervised warm-up (or the state of a resumed run) -------------------------------
                sft_started = time.time()
                version_floor = 0
                if resume_from is not None:
                    version_floor = restore(resume_from, keep_totals=False)
                    print(f"resumed from {resume_from} at RL step {done}", flush=True)
                for s in range(rl.sft_warmup_steps if resume_from is None else 0):
                    prompts = task.sample(rows, rng)
                    batch = sft_batch([p.text for p in prompts], [p.answer for p in prompts], tokenizer)
                    metrics = merge_metrics(ray.get([w.sft_step.remote(shard(batch, r, world))
                                                     for r, w in enumerate(trainers.workers)]))
                    if (s + 1) % 20 == 0 or s + 1 == rl.sft_warmup_steps:
                        logger.log({"sft/loss": metrics["sft_loss"]}, 0)
                        print(f"sft step {s + 1}/{rl.sft_warmup_steps} loss {metrics['sft_loss']:.3f} "
                              f"({time.time() - sft_started:.1f} s)", flush=True)
                sft_s = time.time() - sft_started
                first = start_rl(version_floor)
                version = first["version"]
                checksums = {version: first["checksum"]}
                if rl.checkpoint_every and resume_from is None:  # a trainer restart needs one from step 0 on
                    ckpt.save_checkpoint(trainers.group, ckpt_root, version, fingerprint, driver_state(0),
                                         keep=trainer_cfg.keep_checkpoints)

                # -- RL loop ----------------------------------------------------------------------
                per_worker = rc.prompts_per_step // rc.workers
                G = rc.samples_per_prompt
                async_mode = rl.mode == "async" and rl.max_staleness > 0
                # A batch launched now is trained after the next publish: it may be at most
                # max_staleness versions older than that one.
                min_version = lambda: version + 1 - rl.max_staleness  # noqa: E731
                if async_mode:
                    for i in range(rc.workers):
                        rollouts.launch(i, per_worker, G, min_version())
                rl_started = time.time()
                step = done
                while step < rl.steps:
                    step += 1
                    shares: list[dict] = []  # this step's samples (dropped if the trainer dies)
                    try:
                        t0 = time.perf_counter()
                        sync_stats: list[dict] = []
                        if async_mode:
                            for i in range(rc.workers):
                                result = rollouts.collect(i, per_worker, G)
                                if version - result["version"] > rl.max_staleness:
                                    totals["discarded"] += 1
                                    sync_stats.append(rollouts.resync(i))
                                    result = rollouts.generate_one(i, per_worker, G)
                                if result["sync"]:
                                    sync_stats.append(result["sync"])
                                shares.append(result)
                                rollouts.launch(i, per_worker, G, min_version())  # the next batch starts now
                        else:
                            shares = rollouts.generate_all(per_worker, G)
                        gen_wall = time.perf_counter() - t0

                        batch, roll_metrics = assemble(shares, version, advantage_fn, G, tokenizer.pad_id)
                        t1 = time.perf_counter()
                        train = merge_metrics(ray.get([w.train_step.remote(shard(batch, r, world))
                                                       for r, w in enumerate(trainers.workers)]))
                        train_s = time.perf_counter() - t1
                        t2 = time.perf_counter()
                        publish = trainers.begin_publish()  # parts still encoding: workers fetch as they land
                        version = publish.version
                        checksums[version] = publish.checksum
                        if async_mode:
                            rollouts.offer(list(range(max(first["version"], version - rl.max_staleness - 2), version)))
                        else:
                            sync_stats = rollouts.apply_all()
                        sync_s = time.perf_counter() - t2
                        pub = trainers.finish_publish(publish, None if async_mode else sync_s)
                        totals["payload"] += pub["payload_bytes"]
                        totals["dense"] += pub["dense_bytes"]
                        for st in sync_stats:
                            if "checksum" in st and st["checksum"] != checksums.get(st["version"]):
                                totals["mismatches"] += 1
                        step_s = time.perf_counter() - t0

                        metrics = {
                            **roll_metrics, **{f"train/{k}": v for k, v in train.items() if k not in ("step",)},
                            "sync/payload_bytes": pub["payload_bytes"], "sync/dense_bytes": pub["dense_bytes"],
                            "sync/ratio": pub["dense_bytes"] / max(1, pub["payload_bytes"]),
                            "sync/encode_s": pub.get("encode_s", 0.0), "sync/seconds": sync_s,
                            "density": pub["density"], "step_s": step_s, "gen_wait_s": gen_wall, "train_s": train_s,
                            "version": version, "trainer/restarts": trainers.restarts,
                        }
                        pauses = [st["pause_s"] for st in sync_stats if "pause_s" in st]
                        if pauses:
                            metrics["sync/pause_s"] = max(pauses)
                        waits = [st["weights_wait_s"] for st in sync_stats if "weights_wait_s" in st]
                        if waits:
                            metrics["sync/weights_wait_s"] = max(waits)
                        for k, v in metrics.items():
                            history.setdefault(k, []).append(float(v))
                        logger.log(metrics, step)
                        with open(run_dir / "steps.jsonl", "a") as f:
                            f.write(json.dumps({"step": step, **metrics}) + "\n")
                        if step % rl.log_every == 0 or step == rl.steps:
                            window = history["reward/mean"][-rl.log_every:]
                            from tqdm import tqdm

                            tqdm.write(f"rl step {step}/{rl.steps} v{version} reward {sum(window) / len(window):.3f} "
                                       f"staleness {metrics['staleness/mean']:.2f} sync x{metrics['sync/ratio']:.1f} "
                                       f"step {step_s:.2f}s")
                        if rl.checkpoint_every and (step % rl.checkpoint_every == 0 or step == rl.steps):
                            ckpt.save_checkpoint(trainers.group, ckpt_root, version, fingerprint,
                                                 driver_state(step), keep=trainer_cfg.keep_checkpoints)
                    except (ray.exceptions.RayActorError, UpdateUnavailableError) as e:
                        if trainers.alive():
                            raise  # a rollout worker's death the rollout group did not absorb
                        latest = ckpt.latest_checkpoint(ckpt_root)
                        trainers.restart(type(e).__name__, latest)
                        rollouts.publisher = trainers.publisher
                        # samples in flight come from versions the restored trainer never made
                        totals["dropped_lost"] += sum(len(s["rewards"]) for s in shares) + \
                            rollouts.drain(trainer_lost=True)
                        restore(latest, keep_totals=True)
                        first = start_rl(version + 1)  # above every version a worker may hold
                        version = first["version"]
                        checksums[version] = first["checksum"]
                        if async_mode:
                            for i in range(rc.workers):
                                rollouts.launch(i, per_worker, G, min_version())
                        print(f"trainer restarted (restart {trainers.restarts}) from {latest.name}, "
                              f"RL step {done}", flush=True)
                        step = done
                        continue
                    if on_step is not None:
                        on_step(step, rollouts)

                # -- end: every worker at the final version, checksums compared -----------------------
                rollouts.drain()
                for st in rollouts.apply_all():
                    if st["checksum"] != checksums[version]:
                        totals["mismatches"] += 1
                final_versions, final_checksums = rollouts.final_state()
                totals["mismatches"] += sum(c != checksums[version] for c in final_checksums)
                rl_s = time.time() - rl_started
                if rl.export:  # checks the sparsity pattern of what it writes
                    trainers.group.export(str(run_dir))
                summary = make_summary(cfg, history, totals, version, final_versions, rollouts.restarts,
                                       trainers.restarts,
                                       wall_s=time.time() - started, sft_s=sft_s, rl_s=rl_s)
                summary["export"] = str(run_dir / "model.safetensors") if rl.export else None
                logger.summary(summary)
            finally:
                if rollouts is not None:
                    rollouts.shutdown()
                trainers.shutdown()
    finally:
        logger.close()
    return summary


def rl_fingerprint(cfg: RLJobConfig) -> dict:
    """What a checkpoint must match to be resumed by this config."""
    import torch

    from models import build_model

    with torch.device("meta"):
        model, _ = build_model(cfg.model)
    return {"world_size": cfg.cluster.trainers, "zero_stage": cfg.trainer.zero_stage,
            "precision": cfg.trainer.precision, "sparsity_method": cfg.sparsity.method,
            "param_shapes": {n: list(p.shape) for n, p in model.named_parameters()}, "algo": cfg.algo.name}


def shard(batch: dict, rank: int, world: int) -> dict:
    rows = next(iter(batch.values())).shape[0] // world
    return {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}


def assemble(shares: list[dict], trainer_version: int, algo, group_size: int, pad_id: int):
    """The rollout shares -> one trainer batch (advantages per prompt group) + rollout metrics."""
    import torch

    from rollout.batch import completion_columns, train_batch

    prompt_ids = [p for s in shares for p in s["prompt_ids"]]
    tokens = torch.cat([s["tokens"] for s in shares])
    lengths = torch.cat([s["lengths"] for s in shares])
    rewards = torch.cat([s["rewards"] for s in shares])
    versions = torch.cat([torch.full((len(s["rewards"]),), s["version"]) for s in shares])
    batch = train_batch(prompt_ids, tokens, lengths, pad_id)
    width = batch["input_ids"].shape[1]
    batch["old_logprobs"] = completion_columns(width, torch.cat([s["logprobs"] for s in shares]))
    batch["advantages"] = algo.advantages(rewards, group_size)
    batch["current_version"] = (versions == trainer_version)
    staleness = (trainer_version - versions).float()
    gen_s = max(s["gen_s"] for s in shares)
    failures = sum(len(s["reward_failures"]) for s in shares)
    metrics = {
        "reward/mean": float(rewards.mean()),
        "reward/failures": failures,
        "response/length_mean": float(lengths.float().mean()),
        "response/finished_frac": float(torch.cat([s["finished"] for s in shares]).float().mean()),
        "rollout/tokens_per_s": float(lengths.sum()) / max(gen_s, 1e-9),
        "rollout/gen_s": gen_s,
        "staleness/mean": float(staleness.mean()),
        "staleness/max": float(staleness.max()),
    }
    return batch, metrics


def window_mean(values: list[float], first: bool) -> float:
    k = max(1, math.ceil(len(values) / 10))
    part = values[:k] if first else values[-k:]
    return sum(part) / len(part)


def make_summary(cfg: RLJobConfig, history: dict, totals: dict, version: int, final_versions: list,
                 restarts: int, trainer_restarts: int = 0, **times) -> dict:
    rewards = history.get("reward/mean", [])
    ratios = history.get("sync/ratio", [])
    mean = lambda k: (sum(history[k]) / len(history[k])) if history.get(k) else None  # noqa: E731
    return {
        "mode": cfg.rl.mode, "algo": cfg.algo.name, "task": cfg.task.name, "sparsity_method": cfg.sparsity.method,
        "rl_steps": len(rewards),
        "reward.first_10pct": window_mean(rewards, True) if rewards else None,
        "reward.last_10pct": window_mean(rewards, False) if rewards else None,
        "sync.payload_bytes": totals["payload"], "sync.dense_bytes": totals["dense"],
        "sync.ratio": totals["dense"] / max(1, totals["payload"]),
        "sync.ratio_mean": sum(ratios) / len(ratios) if ratios else None,
        "sync.snapshot_payload_bytes": totals["snapshot_payload"],
        "sync.checksum_mismatches": totals["mismatches"],
        "sync.seconds_mean": mean("sync/seconds"), "sync.pause_s_mean": mean("sync/pause_s"),
        "sync.encode_s_mean": mean("sync/encode_s"),
        "trainer.final_version": version, "rollout.final_versions": list(final_versions),
        "rollout.worker_restarts": restarts, "rollout.discarded_stale": totals["discarded"],
        "trainer.restarts": trainer_restarts, "rollout.dropped_lost_versions": totals.get("dropped_lost", 0),
        "staleness.mean": mean("staleness/mean"), "step_s_mean": mean("step_s"),
        "train.logprob_mismatch_mean": mean("train/logprob_mismatch"),
        "density_final": history["density"][-1] if history.get("density") else None,
        "rollout.tokens_per_s_mean": mean("rollout/tokens_per_s"),
        "reward.failures": int(sum(history.get("reward/failures", []))),
        **{k: round(v, 2) for k, v in times.items()},
    }


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="rl")
def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    return run_rl(to_rl_config(cfg), HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
