"""RL fine-tuning job: `python -m launch.rl [hydra overrides]`; no overrides = the embedded demo.

The driver, top to bottom (as launch/pretrain.py): `plan_run` checks the config, loads the prompts
and picks the checkpoint to resume (every bad input fails there, before Ray starts); then Ray, the
trainer group (RLTrainerWorker ranks) and the rollout group start; `warm_up` trains by SFT on the
task's answers and publishes a first snapshot to every worker; `train` loops over `rl_step`:

    prompts (the driver's task or dataset) -> rollouts -> batch + advantages -> one optimizer
    step -> publish -> workers updated -> metrics, eval, samples table, checkpoint

with the two modes as two small functions:

    sync_rollouts:  every worker generates with the newest weights (applied after the last step)
    async_rollouts: workers generate batch s+1 with the weights they have while the trainer
                    trains on batch s; after the step the new version is offered to every
                    worker, which downloads and decodes it in the background and swaps it in
                    before its next batch. A sample older than rl.max_staleness versions is
                    dropped and its worker resynced (rl.max_staleness=0 makes async mode sync).

Every publish is a sparse delta (sync/), a full snapshot for a worker that is new or behind. The
driver's own state (step, version, reward history, sync totals, prompt RNG / dataset position,
advantage baseline) is one DriverState with state_dict()/load_state_dict(), saved in every
checkpoint.

Fault tolerance: a dead rollout worker is replaced (launch/rl_rollouts.py). A dead trainer rank
(RayActorError from a trainer call) restarts the whole trainer group (launch/rl_trainers.py): the
new group loads the latest checkpoint (with rl.checkpoint_every > 0 one exists from RL step 0 on,
written right after the warm-up), the driver rolls its own state back to it, the restored trainer
publishes a full snapshot under a version above any published before (versions never go
backwards; rollout workers may be ahead of the checkpoint) and every worker applies it. Samples
in flight, made by versions the restored trainer never produced, are dropped and counted
(`rollout.dropped_lost_versions`); the steps after the checkpoint are redone. Sync traffic totals
keep counting what really crossed the wire. At most rl.max_trainer_restarts restarts; a death
during the warm-up, or with rl.checkpoint_every=0, ends the job (TrainerLost).
`run_rl(cfg, run_dir)` is the whole job, callable in-process with a Ray that is already running.
Outputs in run_dir: summary.json, steps.jsonl (every step's metrics), samples.jsonl (with
logger.samples_every), wandb/ (offline run), and the final policy (model.safetensors +
config.json, + sparsity.json when sparse).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

if __name__ == "__main__":  # Ctrl-C during the imports below (torch, Ray: seconds) exits quietly
    import os
    import signal

    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

from launch.env import set_runtime_defaults  # noqa: E402

set_runtime_defaults()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from sync.payloads import PublishStats, SyncStats  # noqa: E402
from sync.transport import PublishHandle  # noqa: E402
from rollout.batch import rl_batch  # noqa: E402
from rollout.results import RolloutBatch  # noqa: E402

from launch.rl_config import RLJobConfig, check_resources, register_configs, rows_per_step, to_rl_config  # noqa: E402
from launch.rl_job import DriverState, RLJob, plan_run  # noqa: E402
from launch.rl_metrics import eval_metrics, make_summary, remember, rollout_metrics, step_metrics, stopwatch  # noqa: E402


def run_rl(cfg: RLJobConfig, run_dir: str | Path, on_step: Callable | None = None) -> dict:
    """Run the job; returns the summary (also written to run_dir/summary.json).

    `on_step(step, job)`, when given, is called after every RL step (tests use it to kill a
    rollout worker or a trainer rank mid-run)."""
    import ray

    from launch.cluster import ray_cluster
    from launch.loggers import MetricsLogger
    from launch.rl_rollouts import RolloutGroup
    from launch.rl_trainers import RLTrainers
    from sync.transport import ShardedPublisher
    from trainer.algos.advantages import build_advantage_estimator

    started = time.time()
    plan = plan_run(cfg, Path(run_dir).resolve())
    cfg = plan.cfg
    logger = MetricsLogger(replace(cfg.logger, name=cfg.logger.name or f"rl-{cfg.task.name}-{cfg.algo.name}-{cfg.rl.mode}"),
                           plan.run_dir, config=asdict(cfg), total_steps=cfg.rl.steps, progress="rl")
    state = DriverState(rng=random.Random(plan.trainer_cfg.seed), advantages=build_advantage_estimator(plan.algo_cfg),
                        task=plan.task)
    try:
        with ray_cluster(cfg.cluster):
            check_resources(cfg, ray.cluster_resources())
            trainers = RLTrainers(cfg, plan.trainer_cfg, plan.algo_cfg)
            publisher = ShardedPublisher(trainers.channels(), cfg.sync)
            rollouts = None
            try:
                rollouts = RolloutGroup(cfg.model, cfg.rollout, cfg.task, publisher, cfg.sync.apply_timeout_s,
                                        cfg.sync.relay_fanout)
                job = RLJob(plan, trainers, publisher, rollouts, logger, state)
                times = {"sft_s": warm_up(job)}
                times["rl_s"] = train(job, on_step)
                summary = finish(job, wall_s=time.time() - started, **times)
            finally:
                if rollouts is not None:
                    rollouts.shutdown()
                trainers.shutdown()
    finally:
        logger.close()
    return summary


# -- phases ---------------------------------------------------------------------------------------

def warm_up(job: RLJob) -> float:
    """Supervised steps on the task's answers (or the state of a resumed run), then RL starts:
    every rank switches objective, publishes, every worker applies; the step-0 checkpoint."""
    from rollout.batch import sft_batch

    plan, rl, started = job.plan, job.cfg.rl, time.time()
    version_floor = 0
    if plan.resume_from is not None:
        version_floor = restore(job, plan.resume_from)
        print(f"resumed from {plan.resume_from} at RL step {job.state.step}", flush=True)
    for s in range(rl.sft_warmup_steps if plan.resume_from is None else 0):
        prompts = plan.task.sample(rows_per_step(job.cfg), job.state.rng)
        batch = sft_batch([p.prompt for p in prompts], [p.answer for p in prompts], plan.tokenizer)
        metrics = job.trainers.sft_step(batch)
        if (s + 1) % 20 == 0 or s + 1 == rl.sft_warmup_steps:
            job.logger.log({"sft/loss": metrics["sft_loss"]}, 0)
            print(f"sft step {s + 1}/{rl.sft_warmup_steps} loss {metrics['sft_loss']:.3f} "
                  f"({time.time() - started:.1f} s)", flush=True)
    sft_s = time.time() - started
    start_rl(job, version_floor)
    if rl.eval_every and job.state.step == 0:  # where RL starts from
        job.logger.log(remember(job.state.history, evaluate(job)), 0)
    if rl.checkpoint_every and plan.resume_from is None:  # a trainer restart needs one from step 0 on
        checkpoint(job)
    return sft_s


def train(job: RLJob, on_step: Callable | None) -> float:
    """The RL loop; a trainer death rolls back to the latest checkpoint and goes on."""
    import ray

    from sync.errors import UpdateUnavailableError

    started = time.time()
    job.logger.start_progress(job.state.step)
    if job.async_mode:
        launch_all(job)
    while job.state.step < job.cfg.rl.steps:
        try:
            rl_step(job)
        except (ray.exceptions.RayActorError, UpdateUnavailableError) as e:  # a rank died, maybe mid-publish
            if job.trainers.alive():
                raise  # a rollout worker's death the rollout group did not absorb
            recover_trainer(job, type(e).__name__)
            continue
        if on_step is not None:
            on_step(job.state.step, job)
    return time.time() - started


def rl_step(job: RLJob) -> None:
    """One RL step: samples -> batch -> one optimizer step -> publish -> workers updated -> log."""
    s, rl = job.state, job.cfg.rl
    times: dict[str, float] = {}
    step = s.step + 1
    with stopwatch(times, "step_s"):
        with stopwatch(times, "gen_wait_s"):
            shares, sync_stats = async_rollouts(job) if job.async_mode else sync_rollouts(job)
        batch = rl_batch(shares, s.version, s.advantages, job.group_size, job.plan.tokenizer.pad_id)
        rollout_numbers = rollout_metrics(shares, s.version, job.group_size)  # before publishing moves the version
        with stopwatch(times, "train_s"):
            train_metrics = job.trainers.train_step(batch)
        with stopwatch(times, "sync/seconds"):
            publishing = begin_publish(job)  # parts still encoding: workers fetch them as they land
            sync_stats += offer_async(job) if job.async_mode else job.rollouts.apply_all()
        pub = finish_publish(job, publishing, None if job.async_mode else times["sync/seconds"])
    job.count_mismatches(sync_stats)
    s.step = step
    metrics = step_metrics(rollout_numbers, train_metrics, pub, sync_stats, times, s.version, job.trainers.restarts)
    if not job.async_mode:
        metrics["sync/relayed_nodes"] = job.rollouts.relayed_nodes  # nodes served by another rollout node
    if job.cfg.sync.verify_every and step % job.cfg.sync.verify_every == 0:
        metrics["sync/verify_mismatches"] = job.verify_workers()[0]
    if rl.eval_every and (step % rl.eval_every == 0 or step == rl.steps):
        metrics.update(evaluate(job))
    job.record(metrics)
    job.log_samples(shares)
    if rl.checkpoint_every and (step % rl.checkpoint_every == 0 or step == rl.steps):
        checkpoint(job)


def sync_rollouts(job: RLJob) -> tuple[list[RolloutBatch], list[SyncStats]]:
    """Sync mode: every worker generates with the trainer's newest weights (they were applied
    after the last step); no weight traffic happens here."""
    shares = [job.next_prompts() for _ in range(job.cfg.rollout.workers)]
    job.in_flight = job.rollouts.generate_all(shares, job.group_size)
    return job.in_flight, []


def async_rollouts(job: RLJob) -> tuple[list[RolloutBatch], list[SyncStats]]:
    """Async mode: collect each worker's batch (launched during the previous step), resync a
    worker whose batch is too stale and generate it again, and launch its next batch at once."""
    rl, s = job.cfg.rl, job.state
    shares: list[RolloutBatch] = []
    sync_stats: list[SyncStats] = []
    job.in_flight = shares
    for i in range(job.cfg.rollout.workers):
        prompts = job.launched[i]
        result = job.rollouts.collect(i, prompts, job.group_size)
        if s.version - result.version > rl.max_staleness:
            s.totals["discarded"] += 1
            sync_stats.append(job.rollouts.resync(i))
            result = job.rollouts.generate_one(i, prompts, job.group_size)
        if result.sync is not None:
            sync_stats.append(result.sync)
        shares.append(result)
        launch(job, i)  # the next batch starts now
    return shares, sync_stats


def offer_async(job: RLJob) -> list[SyncStats]:
    """Async mode, after a publish: every worker fetches the newest version in the background
    (from any of the versions it may hold); the swap stats come with its next batch."""
    v = job.state.version
    job.rollouts.offer(list(range(max(job.rl_start_version, v - job.cfg.rl.max_staleness - 2), v)))
    return []


def begin_publish(job: RLJob) -> PublishHandle:
    """Every rank stages its slice of the new weights and starts encoding it (sync/transport.py);
    the new version is known now, its stats once finish_publish has waited for the encode."""
    publishing = job.publisher.begin()
    job.state.version = publishing.version
    return publishing


def finish_publish(job: RLJob, publishing: PublishHandle, sync_s: float | None) -> PublishStats:
    """The publish's stats; `sync_s` (begin to every worker committed, sync mode) feeds the
    sparse/dense choice of later publishes."""
    pub = job.publisher.finish(publishing)
    if sync_s is not None:
        job.publisher.observe(publishing, sync_s)
    job.checksums[pub.version] = pub.checksum
    job.state.totals["payload"] += pub.payload_bytes
    job.state.totals["dense"] += pub.dense_bytes
    return pub


def start_rl(job: RLJob, version_floor: int) -> PublishStats:
    """RL objective on every rank, publish under a version >= version_floor, and bring every
    rollout worker to it (full snapshots); the publish stats."""
    job.trainers.group.call("begin_rl", job.state.step)
    job.trainers.group.call("set_version_floor", version_floor)
    started = time.perf_counter()
    publishing = job.publisher.begin()
    job.state.version = job.rl_start_version = publishing.version
    applied = job.rollouts.apply_all()
    pub = job.publisher.finish(publishing)
    job.publisher.observe(publishing, time.perf_counter() - started)
    job.checksums[pub.version] = pub.checksum
    for stats in applied:
        job.state.totals["snapshot_payload"] += stats.payload_bytes
        job.state.totals["mismatches"] += stats.checksum != pub.checksum
    return pub


def launch(job: RLJob, i: int) -> None:
    """Async mode: worker i starts its next batch (new prompts) with the weights it has."""
    job.launched[i] = job.next_prompts()
    job.rollouts.launch(i, job.launched[i], job.group_size, job.min_version())


def launch_all(job: RLJob) -> None:
    for i in range(job.cfg.rollout.workers):
        launch(job, i)


def evaluate(job: RLJob) -> dict[str, float]:
    """The eval prompts split over the workers: greedy reward mean and pass@k (k = rl.eval_samples)."""
    rl, prompts, n = job.cfg.rl, job.plan.eval_prompts, job.cfg.rollout.workers
    shares = [prompts[i * len(prompts) // n:(i + 1) * len(prompts) // n] for i in range(n)]
    return eval_metrics(job.rollouts.evaluate(shares, rl.eval_samples, rl.pass_threshold), rl.eval_samples)


# -- trainer failure and checkpoints --------------------------------------------------------------

def recover_trainer(job: RLJob, reason: str) -> None:
    """A trainer rank died: a new group loads the latest checkpoint, the driver rolls back to it,
    RL restarts above every version a worker may hold, and the samples in flight are dropped."""
    from trainer import checkpoint as ckpt

    latest = job.trainers.restart(reason, ckpt.latest_checkpoint(job.plan.checkpoint_root))
    job.publisher.reconnect(job.trainers.channels())  # what the old ranks published died with them
    # samples in flight come from versions the restored trainer never made
    dropped = sum(s.size for s in job.in_flight) + job.rollouts.drain(trainer_lost=True)
    job.state.totals["dropped_lost"] += dropped
    newest = job.state.version
    restore(job, latest, keep_totals=True)
    start_rl(job, newest + 1)  # above every version a worker may hold
    if job.async_mode:
        launch_all(job)
    print(f"trainer restarted (restart {job.trainers.restarts}) from {latest.name}, RL step {job.state.step}",
          flush=True)


def restore(job: RLJob, path: Path, keep_totals: bool = False) -> int:
    """Load checkpoint `path` into the trainers and roll the driver back to it; returns the weight
    version it was saved at."""
    driver = job.trainers.group.load_checkpoint(str(path)).driver
    job.state.load_state_dict(driver, keep_totals)
    steps_file = job.plan.run_dir / "steps.jsonl"  # drop the rows written after the checkpoint
    if steps_file.exists():
        keep = [ln for ln in steps_file.read_text().splitlines() if json.loads(ln)["step"] <= job.state.step]
        steps_file.write_text("".join(ln + "\n" for ln in keep))
    return job.state.version


def checkpoint(job: RLJob) -> Path:
    from trainer import checkpoint as ckpt

    return ckpt.save_checkpoint(job.trainers.group, job.plan.checkpoint_root, job.state.version, job.plan.fingerprint,
                                ckpt.CheckpointExtra(driver=job.state.state_dict()), keep=job.plan.trainer_cfg.keep_checkpoints)


def finish(job: RLJob, **times: float) -> dict:
    """Every worker at the final version (checksums compared), export, summary.json."""
    s, version = job.state, job.state.version
    job.rollouts.drain()
    job.count_mismatches(job.rollouts.apply_all())
    _, final_versions = job.verify_workers()  # every worker at the final version, its weights re-read
    if job.cfg.rl.eval_every and (not s.history.get("eval/version") or s.history["eval/version"][-1] != version):
        job.logger.log(remember(s.history, evaluate(job)), s.step)  # every worker holds the final version now
    if job.cfg.rl.export:  # checks the sparsity pattern of what it writes
        dtype = job.cfg.sync.published_dtype if job.cfg.rl.export_dtype == "published" else job.cfg.rl.export_dtype
        job.trainers.group.export(str(job.plan.run_dir), dtype)
    if job.cfg.rollout.export_final:
        job.rollouts.export_final(str(job.plan.run_dir))
    summary = make_summary(job.cfg, s.history, s.totals, version, final_versions, job.rollouts.restarts,
                           job.trainers.restarts, **times)
    summary["rollout.engine_failures"] = job.rollouts.engine_failures
    summary["rollout.corrupt_resyncs"] = job.rollouts.corrupt_resyncs  # workers whose weights were found altered
    summary["rollout.refetches"] = job.rollouts.refetches  # updates fetched again after a part did not arrive
    summary["export"] = str(job.plan.run_dir / "model.safetensors") if job.cfg.rl.export else None
    job.logger.summary(summary)
    from launch.curves import RL_PANELS

    job.logger.plot(RL_PANELS)
    return summary


register_configs()


def run_from_hydra(cfg: DictConfig, run_dir: Path) -> dict:
    """The job as `python -m launch.rl` runs it: the run named after its overrides."""
    from hydra.core.hydra_config import HydraConfig

    from launch.loggers import run_name

    job_cfg = to_rl_config(cfg)
    if job_cfg.logger.name is None:
        job_cfg = replace(job_cfg, logger=replace(job_cfg.logger,
                                                  name=run_name("rl", list(HydraConfig.get().overrides.task))))
    return run_rl(job_cfg, run_dir)


def _job_spec():
    from launch.cli import JobSpec
    from launch.console import rl_summary
    from launch.rl_config import RLJobConfig

    return JobSpec("rl", RLJobConfig, register_configs, run_from_hydra, "rl.resume", rl_summary)


@hydra.main(version_base="1.3", config_path="../conf", config_name="rl")
def main(cfg: DictConfig) -> dict | None:
    from launch.cli import run_job

    return run_job(_job_spec(), cfg)


if __name__ == "__main__":
    from launch.cli import main as cli_main

    cli_main(_job_spec(), main)
