"""The RL job across a link that stops carrying packets mid-run, then comes back.

    python -m bench.rl_link_stall [--outage-s 22] [--cut-after-step 4] [--steps 16]
                                  [--out bench/results/rl_link_stall.json] [job overrides...]
                                  (root: it makes network namespaces)

Two Ray nodes in their own network namespaces joined by one link (bench/netlab.py,
bench/lab_ray.py): the trainer node (the driver and 2 trainer ranks) and the rollout node
(2 rollout workers), pinned there by custom resources. `python -m launch.rl` runs with the
demo's defaults (sync mode: every step ends in a weight sync) and `rl.steps=--steps`, with
no other overrides unless given. Once the job has logged step `--cut-after-step` (steps.jsonl),
every packet on the link is dropped (NetLab.cut) for `--outage-s` seconds, then the link is
restored. Ray declares a node dead after about 24 s without its heartbeats (an outage longer than
that kills the rollout node's raylet when it comes back).

Reported (JSON): the job's exit code and its last output lines, the seconds from the outage's
start and from the link's return to the job's end, the steps it finished, and from its
summary.json the end-of-job weight check (`sync.verify_checks`, `sync.verify_mismatches`: each
worker's committed weights re-read and digested against the trainer's), worker restarts and
refetches. `--max-wait-s` bounds the wait for the job (default 600 s after the link returns);
past it the job is killed and reported as hung. The bars (issue: sync at cluster shape): 22 s
outage: every step finished, re-read weights equal, end within 120 s of the link's return; 45 s:
finished, or one clear error, within 180 s of the outage's start; `ok` says whether this run met
the bar for its outage.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.lab_ray import cluster_env, start_cluster, stop_node

PORT = 6391
TRAINER_RES, ROLLOUT_RES = "stl_trainer_node", "stl_rollout_node"


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "steps.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def output_tail(log: Path, lines: int = 8) -> list[str]:
    """The job's last console lines, progress bars left out."""
    text = log.read_text(errors="replace").replace("\r", "\n")
    return [ln for ln in text.splitlines() if ln.strip() and "%|" not in ln][-lines:]


def run(args, lab, tmp: Path, env: dict) -> dict:
    head = f"{lab.ip['a']}:{PORT}"
    run_dir = tmp / "run"
    cmd = [sys.executable, "-m", "launch.rl", "cluster=existing", f"cluster.address={head}",
           f"+cluster.resources_per_trainer={{{TRAINER_RES}: 1}}", f"+rollout.resources={{{ROLLOUT_RES}: 1}}",
           f"rl.steps={args.steps}", f"hydra.run.dir={run_dir}", *args.overrides]
    log = tmp / "job.log"
    job = subprocess.Popen(lab.exec_in("a", cmd), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                           start_new_session=True, env=env)
    out: dict = {"command": " ".join(["python", *cmd[1:]]), "outage_s": args.outage_s}
    try:
        deadline = time.time() + args.start_timeout_s
        while steps_logged(run_dir) < args.cut_after_step:
            if job.poll() is not None or time.time() > deadline:
                out["error"] = f"the job did not reach step {args.cut_after_step} (exit {job.poll()})"
                out["job_output_tail"] = output_tail(log)
                return out
            time.sleep(0.5)
        out["steps_before_outage"] = steps_logged(run_dir)
        cut_at = time.time()
        lab.cut()
        ended_at = None  # when the job ended, if it did during the outage
        while time.time() < cut_at + args.outage_s:
            if ended_at is None and job.poll() is not None:
                ended_at = time.time()
            time.sleep(0.2)
        lab.limit(None)
        restored_at = time.time()
        out["steps_during_outage"] = steps_logged(run_dir) - out["steps_before_outage"]
        try:
            rc = job.wait(timeout=args.max_wait_s)
        except subprocess.TimeoutExpired:
            rc = None
        ended_at = ended_at or time.time()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGINT)
            try:
                job.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
    out.update(exit_code=rc, hung=rc is None, steps_done=steps_logged(run_dir),
               end_after_outage_start_s=ended_at - cut_at, end_after_link_return_s=ended_at - restored_at,
               job_output_tail=output_tail(log))
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        out["summary"] = {k: summary.get(k) for k in (
            "rl_steps", "sync.verify_checks", "sync.verify_mismatches", "sync.checksum_mismatches",
            "rollout.worker_restarts", "rollout.refetches", "trainer.restarts")}
    finished = rc == 0 and out["steps_done"] == args.steps and out.get("summary", {}).get("sync.verify_mismatches") == 0 \
        and (out.get("summary", {}).get("sync.verify_checks") or 0) > 0
    if args.outage_s <= 22:
        out["ok"] = finished and out["end_after_link_return_s"] <= 120
    else:  # past Ray's node timeout: finish, or stop with an error, within 180 s of the outage's start
        out["ok"] = rc is not None and out["end_after_outage_start_s"] <= 180 and (finished or rc != 0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rl_link_stall", description=__doc__.split("\n\n")[0])
    p.add_argument("--outage-s", type=float, default=22.0)
    p.add_argument("--cut-after-step", type=int, default=4)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--start-timeout-s", type=float, default=900.0, help="for the job to reach --cut-after-step")
    p.add_argument("--max-wait-s", type=float, default=600.0, help="for the job to end after the link returns")
    p.add_argument("--out", default="bench/results/rl_link_stall.json")
    p.add_argument("overrides", nargs="*", help="more `python -m launch.rl` overrides")
    args = p.parse_args(argv)

    from bench.netlab import NetLab, NetLabUnavailable

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the namespaces and Ray nodes are removed
    try:
        NetLab.check()
    except NetLabUnavailable as e:
        print(f"bench.rl_link_stall skipped: {e}")
        return 0
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    procs: list = []
    with NetLab("stl", "10.232.0") as lab, tempfile.TemporaryDirectory(prefix="stl") as tmp_name:
        tmp = Path(tmp_name)
        env = cluster_env()
        try:
            procs += start_cluster(lab, PORT, {"a": {TRAINER_RES: 4}, "b": {ROLLOUT_RES: 4}}, tmp, env,
                                   object_store_bytes=1 << 30)
            if len(procs) < 2:
                print("bench.rl_link_stall: the Ray nodes did not start (see the logs above)")
                return 1
            result = run(args, lab, tmp, env)
        finally:
            for proc in reversed(procs):
                stop_node(proc)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "job_output_tail"}, indent=1))
    print("job's last lines:\n  " + "\n  ".join(result.get("job_output_tail", [])))
    print(f"wrote {out_path}; {'meets' if result.get('ok') else 'does NOT meet'} the bar for a {args.outage_s:g} s outage")
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
