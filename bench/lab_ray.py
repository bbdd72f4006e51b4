"""Ray nodes inside a NetLab (bench/netlab.py): one `ray start --block` per host namespace, the
head on host a, each node with the custom resources that pin work to it; used by
bench/sync_cluster.py and bench/rl_link_stall.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def cluster_env(environ: dict | None = None) -> dict:
    """The environment of a lab cluster's Ray nodes and driver: one authentication setting for
    all of them, whatever ~/.ray or the caller's environment holds. Ray 2.60 turns token
    authentication on in a process that finds ~/.ray/auth_token (any local `ray.init` leaves
    one) unless RAY_AUTH_MODE is set, so a joining node and the head could disagree; the
    lab's cluster is its own, so every process of it gets token mode and one fresh token
    (RAY_AUTH_TOKEN, which Ray reads before any token file)."""
    import secrets

    env = dict(os.environ if environ is None else environ)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return env


def _start_ray(lab, side: str, cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(lab.exec_in(side, [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *cmd]),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _wait_started(proc: subprocess.Popen, log: Path, head: subprocess.Popen, timeout_s: float) -> bool:
    """Whether `ray start --block` came up (and stayed up for a few seconds) within the timeout."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None or head.poll() is not None:
            return False
        if "Ray runtime started" in log.read_text():
            time.sleep(10)  # its raylet may still die waiting for its agents
            return proc.poll() is None
        time.sleep(1)
    return False


def stop_node(proc: subprocess.Popen) -> None:
    """Stop a process session we started (ray start --block and everything it spawned)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    # raylet's workers may outlive the group leader: kill whatever is left of the session
    subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], capture_output=True)


def start_cluster(lab, port: int, resources: dict[str, dict[str, float]], tmp: Path, env: dict,
                  object_store_bytes: int, num_cpus: int = 4) -> list[subprocess.Popen]:
    """A head on host a and one node on every other host of `lab`, each with `resources[side]`;
    the processes started, in host order. A node that does not come up after 3 tries is left
    out (its log and the head's printed): the caller compares the count with the hosts."""
    common = [f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--object-store-memory={object_store_bytes}"]
    head = f"{lab.ip['a']}:{port}"
    procs = [_start_ray(lab, "a", ["--head", f"--node-ip-address={lab.ip['a']}", f"--port={port}",
                                   "--include-dashboard=false", f"--temp-dir={tmp / 'ray'}",
                                   f"--resources={json.dumps(resources.get('a', {}))}", *common], tmp / "head.log", env)]
    time.sleep(5)  # a worker node's `ray start` retries until the head's GCS answers
    for side in lab.sides[1:]:
        log = tmp / f"node_{side}.log"
        for attempt in range(3):  # on a busy machine a node's raylet can time out waiting for its agents
            node = _start_ray(lab, side, [f"--address={head}", f"--node-ip-address={lab.ip[side]}",
                                          f"--resources={json.dumps(resources.get(side, {}))}", *common], log, env)
            if _wait_started(node, log, procs[0], timeout_s=300):
                procs.append(node)
                break
            stop_node(node)
        else:
            for name in ("head.log", log.name):
                print(f"--- {name}\n" + (tmp / name).read_text()[-2000:])
            return procs
    return procs
