"""End-to-end weight sync on rate-limited links: sparse deltas vs full sends, two Ray nodes.

    python -m bench.sync_cluster [--quick] [--out FILE]    (root: it makes network namespaces)

Two Ray nodes run in their own network namespaces joined by a veth pair (bench/netlab.py): the
trainer node (a trainer group of 2 DeepSpeed ranks, ZeRO-1, fp32 AdamW masters, lr 1e-6) and the
rollout node (3 receivers, each a bf16 copy of the model with a WeightReceiver; one stages each
update and the other two commit its staging, as the RL job's rollout group does). With
`--receiver-nodes K` (up to 4) the 3 receivers spread over K rollout nodes, each host on its own
shaped link to a switch; one receiver per node stages, and every node after the first gets the
update relayed by its parent node (sync/relay.py, `--relay-fanout`, default 1, a chain, as
sync.relay_fanout), so `trainer_egress_bytes` (the trainer node's link counter) stays about one
payload whatever K is; `sparse_node_egress_bytes` has every host's. Per link rate
(100 Mbit/s, 1 Gbit/s, 10 Gbit/s and unlimited, set with `tc`), after real optimizer steps
(`--updates train`, the full run's default) or `--change-fraction` (1 %) of the weights moved by
+-1 ulp (`--updates synthetic`, --quick's default: how almost every real change at a small lr
looks, at the ~1 % that the sync bar names; real steps change ~2 % on this small model), it
times publishes from "optimizer step done" to "every receiver committed" (median of several):
- sparse: the fast-level delta of every rank's slice, pipelined (sync/transport.py);
- full: the full bf16 weights, raw, over the same path (what a full broadcast ships);
- auto: what `sync.mode=auto` does (sync/policy.py), with a fresh chooser per link rate fed only
  by its own decisions: its first two publishes measure both modes (`auto_first_s`), the median
  of the ones after them is `auto_s`;
and reads the bytes on the wire from the interfaces' counters; `full_floor_s` / `sparse_floor_s`
are what the link alone needs for each payload (bytes x 8 / rate; null when unlimited). After every publish, outside the
timed window, every receiver's weights are read again and digested (not the digests cached at
commit) and compared with the trainer's checksum: `links[].verified` is true only when every
receiver matched after every publish of that link, and the benchmark exits 1 when one did not.

Output: JSON (default bench/results/sync_cluster.json) and a PNG beside it (sync seconds vs link
rate). Without root (or without `ip`/`tc`) it says so and exits 0 without measuring.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.lab_ray import cluster_env, start_cluster, stop_node
from sync.payloads import SyncStats
from trainer.algos.rl_worker import RLTrainerWorker

LINKS = [100, 1000, 10000, None]  # Mbit/s; None = no limit
TRAINER_RES, ROLLOUT_RES = "stb_trainer_node", "stb_rollout_node"


def rollout_resource(node: int) -> str:
    """The custom resource that pins receivers to rollout node `node` (0-based)."""
    return ROLLOUT_RES if node == 0 else f"{ROLLOUT_RES}_{node}"
PORT = 6390


class RssPeak:
    """Peak growth of this process's resident memory while the block runs (sampled every 10 ms:
    the arrays of a publish live for its whole length, and faster sampling takes the GIL from
    the work being measured)."""

    def __init__(self):
        self.peak = self.base = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self) -> None:
        self.base = self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        return self.peak - self.base


class PeakRss:
    """The true peak growth of this process's resident memory while the block runs: the
    kernel's high-water mark (VmHWM) is reset to the current RSS when the block starts (writing
    5 to /proc/self/clear_refs) and read when it ends, so no short-lived allocation is missed
    between samples. Where the reset is refused, falls back to sampling (RssPeak)."""

    def __init__(self):
        self.base = 0
        self._sampler: RssPeak | None = None

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"/proc/self/status has no {field}")

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._status("VmRSS")
            self._sampler = None
        except OSError:
            self._sampler = RssPeak()
            self._sampler.start()

    def stop(self) -> int:
        if self._sampler is not None:
            return self._sampler.stop()
        return max(0, self._status("VmHWM") - self.base)


class BenchRank(RLTrainerWorker):
    """A trainer rank that also reports its peak RSS growth between rss_start() and rss_stop()
    and its publisher's standing copies."""

    def rss_start(self) -> None:
        self._rss = PeakRss()
        self._rss.start()

    def rss_stop(self) -> int:
        return self._rss.stop()

    def publisher_standing_bytes(self) -> int:
        return self.slice_publisher.standing_bytes()

    def synthetic_step(self, seed: int, fraction: float) -> None:
        """Instead of an optimizer step: move `fraction` of the weights, drawn alike on every rank,
        by +-1 bf16 ulp (how almost all real changes at a small lr look), in the weights that a
        publish under ZeRO 0-2 reads."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in self.module.named_parameters():
                bits = p.data.to(torch.bfloat16).view(torch.int16)
                moved = torch.rand(p.shape, generator=gen) < fraction
                step = torch.where(torch.rand(p.shape, generator=gen) < 0.5, 1, -1).to(torch.int16)
                step = torch.where(bits & 0x7FFF == 0, 1, step).to(torch.int16)  # +-0 grows: never 0xFFFF (NaN)
                new = torch.where(moved, bits + step, bits).view(torch.bfloat16)
                p.data.copy_(new.to(p.dtype))
        self.version_offset += 1  # a new version to publish, as an optimizer step makes one

    def slice_bytes(self) -> int:
        return sum(t.numel() * 2 for t in self.published_slice().tensors.values())


@dataclass
class Applied:
    """A receiver's commit stats and the extra peak RSS the update cost it."""
    stats: SyncStats
    extra_rss: int


class BenchReceiver:
    def __init__(self, model_cfg):
        import torch

        from models import build_model
        from sync.receiver import WeightReceiver

        torch.set_num_threads(1)
        model, _ = build_model(model_cfg)
        self.model = model.to(torch.bfloat16)
        self.receiver = WeightReceiver(dict(self.model.named_parameters()), fetch_timeout_s=300)

    def apply(self, update) -> Applied:
        rss = PeakRss()
        rss.start()
        stats = self.receiver.apply(update)
        return Applied(stats, rss.stop())

    # one receiver per node stages, the others commit its staging (as launch/rl_rollouts.py does)
    def stage_shared(self, update):
        self._rss = PeakRss()
        self._rss.start()
        self._staged = self.receiver.fetch(update)
        return self.receiver.share(self._staged)

    def commit_shared(self, _shared) -> Applied:
        stats = self.receiver.commit(self._staged)
        return Applied(stats, self._rss.stop())

    def apply_shared(self, shared) -> Applied:
        rss = PeakRss()
        rss.start()
        stats = self.receiver.commit(self.receiver.adopt(shared))
        return Applied(stats, rss.stop())

    def reread_checksum(self) -> str:
        """The committed weights' checksum from their bits as they are now (not from digests
        cached at commit): what `verified` compares with the trainer's."""
        return self.receiver.reread_checksum()

    def alter(self, key: str, index: int) -> None:
        """Flip one bit of a committed element behind the receiver's back (tests of the check)."""
        import torch

        with torch.no_grad():
            self.receiver.target[key].data.view(-1).view(torch.int16)[index] ^= 1


def reread_verified(receivers: list, checksum: str, timeout_s: float = 600.0) -> list[bool]:
    """Per receiver actor: whether its re-read weights have the trainer's `checksum`."""
    import ray

    return [c == checksum for c in ray.get([r.reread_checksum.remote() for r in receivers], timeout=timeout_s)]


# ---------------------------------------------------------------- the driver (inside namespace a)


def drive(args) -> dict:
    import ray
    import torch

    from launch.cluster import ClusterConfig
    from launch.trainer_group import TrainerGroup
    from models import ModelConfig
    from sync.config import SyncConfig
    from sync.policy import ModeChooser
    from sync.transport import ActorChannel, ShardedPublisher
    from trainer.algos.config import AlgoConfig
    from trainer.config import OptimizerConfig, TrainerConfig
    from trainer.sparsity import SparsityConfig
    from bench.netlab import NetLab

    from sync.relay import relay_parents, relay_update

    lab = NetLab(args.lab, hosts=1 + args.receiver_nodes)
    ray.init(address=args.address, logging_level=logging.ERROR)
    deadline = time.time() + 600  # the other nodes register once their raylets are up (slow on a busy machine)
    wanted = {TRAINER_RES} | {rollout_resource(k) for k in range(args.receiver_nodes)}
    while not wanted <= set(ray.cluster_resources()):
        if time.time() > deadline:
            raise SystemExit(f"the rollout nodes did not join the cluster within 600 s: {ray.cluster_resources()}")
        time.sleep(1)
    model_cfg = ModelConfig(n_layer=args.layers, n_head=args.heads, n_embd=args.embd, block_size=64)
    trainer_cfg = TrainerConfig(max_steps=10_000, micro_batch_size=1, seq_len=32, zero_stage=args.zero_stage, num_threads=1)
    opt_cfg = OptimizerConfig(lr=1e-6, min_lr=1e-6, warmup_steps=0, weight_decay=0.0)
    cluster = ClusterConfig(address=args.address, trainers=2, cpus_per_trainer=1,
                            resources_per_trainer={TRAINER_RES: 1}, setup_timeout_s=900)
    sync_cfg = SyncConfig(level="fast", mode="sparse", part_bytes=args.part_mb << 20)
    sparsity_cfg = None if args.sparsity == "none" else SparsityConfig(method=args.sparsity)
    group = TrainerGroup(cluster, model_cfg, trainer_cfg, opt_cfg, sparsity_cfg, worker_cls=BenchRank)
    group.call("configure_rl", AlgoConfig(), sync_cfg, 1e-6, 1e-6)
    publisher = ShardedPublisher([ActorChannel(w) for w in group.workers], sync_cfg)
    # Actor handles: their methods resolve at run time (Ray's ActorHandle types every attribute as Never).
    # 3 receivers over the rollout nodes, round robin (one per node with 3 nodes)
    receiver_node = [k % args.receiver_nodes for k in range(max(3, args.receiver_nodes))]
    receivers: list[Any] = [ray.remote(BenchReceiver).options(num_cpus=0.5, resources={rollout_resource(node): 1}).remote(model_cfg)
                            for node in receiver_node]
    node_ids = ray.get([r.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()) for r in receivers])
    params = group.info[0].parameters
    slice_bytes = group.call("slice_bytes")
    gen = torch.Generator().manual_seed(0)
    versions: list[int | None] = [None] * len(receivers)

    steps = iter(range(1, 1 << 30))

    def train_step() -> None:
        if args.updates == "synthetic":
            group.call("synthetic_step", next(steps), args.change_fraction)
            return
        batches = [{"tokens": torch.randint(0, 256, (1, 33), generator=gen)} for _ in group.workers]
        group.call_per_rank("train_step", batches)

    def sync(mode: str) -> dict:
        """One publish in `mode`, timed from here (the optimizer step is done) to every commit."""
        publisher.chooser = choosers[mode]
        tx0 = lab.tx_bytes()
        group.call("rss_start")
        t0 = time.perf_counter()
        handle = publisher.begin()
        begin_s = time.perf_counter() - t0
        update = publisher.update_for(versions[0])
        if len(set(versions)) == 1 and update.kind != "none":
            # one version: each node decodes once (full sends too), nodes after the first get it
            # relayed by their parent node (sync/relay.py), as launch/rl_rollouts.py does
            refs: dict[int, Any] = {}
            nodes = list(dict.fromkeys(receiver_node))
            node_updates: list = []
            for parent in relay_parents(len(nodes), args.relay_fanout):
                node_updates.append(update if parent is None else relay_update(node_updates[parent], node_ids[receiver_node.index(nodes[parent])]))
            for node, node_update in zip(nodes, node_updates):
                lead, *rest = [i for i, n in enumerate(receiver_node) if n == node]
                shared = receivers[lead].stage_shared.remote(node_update)
                refs[lead] = receivers[lead].commit_shared.remote(shared)
                refs.update({i: receivers[i].apply_shared.remote(shared) for i in rest})
            applied = ray.get([refs[i] for i in range(len(receivers))])
        else:
            applied = ray.get([r.apply.remote(publisher.update_for(versions[i])) for i, r in enumerate(receivers)])
        seconds = time.perf_counter() - t0
        stats = publisher.finish(handle)
        publisher.observe(handle, seconds)
        rank_rss = group.call("rss_stop")
        pinned = publisher.pinned_bytes()
        tx1 = lab.tx_bytes()
        for i, a in enumerate(applied):
            versions[i] = a.stats.version
        # outside the timed window: every receiver's weights read again and digested
        ok = reread_verified(receivers, stats.checksum)
        if not all(ok):
            print(f"receivers {[i for i, good in enumerate(ok) if not good]} are not bit-identical to the trainer "
                  f"after version {handle.version} (re-read weights)", flush=True)
        return {"mode": mode, "dense": handle.dense, "seconds": seconds, "payload_bytes": stats.payload_bytes,
                "verified": all(ok), "pinned_bytes": pinned,
                "dense_bytes": stats.dense_bytes, "changed": stats.changed, "encode_s": stats.encode_s,
                "wire_bytes": tx1["a"] - tx0["a"],
                "wire_bytes_back": sum(tx1[side] - tx0[side] for side in tx1 if side != "a"),
                "node_egress_bytes": {side: tx1[side] - tx0[side] for side in tx1},
                "rank_extra_rss": rank_rss, "receiver_extra_rss": max(a.extra_rss for a in applied),
                "receiver_decode_s": max(a.stats.decode_s for a in applied),
                "receiver_wait_s": max(a.stats.transfer_s for a in applied), "begin_s": begin_s,
                "receiver_staged_bytes": max(a.stats.staged_bytes for a in applied)}

    choosers = {"sparse": ModeChooser("sparse"), "dense": ModeChooser("dense")}
    lab.limit(None)
    if sparsity_cfg is not None:  # the sparsifier sets its masks in its first step
        batches = [{"tokens": torch.randint(0, 256, (1, 33), generator=gen)} for _ in group.workers]
        group.call_per_rank("train_step", batches)
    first = sync("dense")  # every receiver gets version 0 (a full send)
    print(f"model {params / 1e6:.0f}M params, first full send {first['seconds']:.2f} s", flush=True)
    # A fresh optimizer's first steps move every weight by about lr and change several times
    # more bf16 elements than a run publishing every step sees later (Adam's moments settle in
    # ~30 steps): those publishes are made, and checked, but not measured.
    warm = []
    for _ in range(args.warmup_steps):
        train_step()
        warm.append(sync("sparse")["verified"])
    rows, all_sparse, all_dense, all_runs = [], [], [], [first]
    for rate in args.links:
        lab.limit(rate)
        runs: dict[str, list[dict]] = {"sparse": [], "dense": [], "auto": []}
        choosers["auto"] = ModeChooser("auto")  # nothing carried over from other links or forced runs
        for mode, count in (("sparse", args.publishes), ("dense", args.full_publishes), ("auto", args.publishes + 2)):
            for _ in range(count):
                train_step()
                runs[mode].append(sync(mode))
        auto_first, runs["auto"] = runs["auto"][:2], runs["auto"][2:]
        all_sparse += runs["sparse"]
        all_dense += runs["dense"]
        all_runs += [r for rs in (*runs.values(), auto_first) for r in rs]
        med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
        row = {
            "rate_mbit": rate,
            "sparse_s": med(runs["sparse"], "seconds"), "full_s": med(runs["dense"], "seconds"),
            "auto_s": med(runs["auto"], "seconds"),
            "auto_choice": "dense" if sum(r["dense"] for r in runs["auto"]) * 2 > len(runs["auto"]) else "sparse",
            "auto_first_s": [r["seconds"] for r in auto_first],
            "auto_choices": ["dense" if r["dense"] else "sparse" for r in auto_first + runs["auto"]],
            "sparse_payload_bytes": int(med(runs["sparse"], "payload_bytes")),
            "sparse_wire_bytes": int(med(runs["sparse"], "wire_bytes")),
            "full_wire_bytes": int(med(runs["dense"], "wire_bytes")),
            # what the trainer node sent for a sparse publish (its link's counter): with relaying,
            # about one payload whatever the number of rollout nodes
            "trainer_egress_bytes": int(med(runs["sparse"], "wire_bytes")),
            "full_trainer_egress_bytes": int(med(runs["dense"], "wire_bytes")),
            # per host (a = the trainer node, b, c, ... the rollout nodes), sparse publishes
            "sparse_node_egress_bytes": {side: int(statistics.median(r["node_egress_bytes"][side] for r in runs["sparse"]))
                                         for side in runs["sparse"][0]["node_egress_bytes"]},
            "full_payload_bytes": int(med(runs["dense"], "payload_bytes")),
            "sparse_encode_s": med(runs["sparse"], "encode_s"),
            "sparse_receiver_decode_s": med(runs["sparse"], "receiver_decode_s"),
            "sparse_receiver_wait_s": med(runs["sparse"], "receiver_wait_s"),
            "sparse_begin_s": med(runs["sparse"], "begin_s"),
            "verified": all(r["verified"] for rs in (*runs.values(), auto_first) for r in rs),
        }
        # what the link alone needs for each payload (bytes x 8 / rate): the floor no send beats
        floor = (lambda n: n * 8 / (rate * 1e6)) if rate else (lambda n: None)  # noqa: E731
        row["full_floor_s"] = floor(row["full_payload_bytes"])
        row["sparse_floor_s"] = floor(row["sparse_payload_bytes"])
        row["speedup"] = row["full_s"] / row["sparse_s"]
        row["auto_vs_full"] = row["auto_s"] / row["full_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    lab.limit(None)
    numel = params
    result = {
        "model_params": params, "trainer_ranks": len(group.workers), "receivers": len(receivers),
        "receiver_nodes": args.receiver_nodes, "relay_fanout": args.relay_fanout,
        "change_fraction": statistics.median(r["changed"] / numel for r in all_sparse),
        "published_bytes_total": first["dense_bytes"], "published_bytes_per_rank": slice_bytes,
        "sparsity": args.sparsity,
        # the copies a rank's publisher keeps between publishes (its base and spare buffers)
        "publisher_standing_bytes_per_rank": group.call("publisher_standing_bytes"),
        # peak RSS growth of a rank during a sparse publish, the kernel's high-water mark reset
        # before each one (bench.sync_cluster.PeakRss); full sends beside it
        "publish_peak_rss_bytes_per_rank": [max(r["rank_extra_rss"][k] for r in all_sparse) for k in range(len(slice_bytes))],
        "full_publish_peak_rss_bytes_per_rank": [max(r["rank_extra_rss"][k] for r in all_dense) for k in range(len(slice_bytes))],
        "publish_extra_rss_bytes_per_rank": [max(r["rank_extra_rss"][k] for r in all_sparse) for k in range(len(slice_bytes))],
        # payload bytes the publisher's history (and a snapshot for late receivers) kept pinned
        # in the object store, the most after any publish
        "object_store_pinned_bytes": max(r["pinned_bytes"] for r in all_runs),
        "receiver_extra_rss_bytes": max(r["receiver_extra_rss"] for r in all_sparse),
        "receiver_staged_bytes": max(r["receiver_staged_bytes"] for r in all_sparse),
        "links": rows,
        # the first full send and the warm-up publishes are checked too, outside links[]
        "verified": first["verified"] and all(warm) and all(r["verified"] for r in rows),
        "setup": {"updates": args.updates, "zero_stage": args.zero_stage, "lr": 1e-6, "optimizer": "AdamW (fp32 masters)", "published_dtype": "bfloat16",
                  "level": "fast", "part_bytes": args.part_mb << 20, "publishes_per_mode": args.publishes,
                  "full_publishes": args.full_publishes, "layers": args.layers, "embd": args.embd,
                  "warmup_steps": args.warmup_steps, "sparsity": args.sparsity},
    }
    group.shutdown()
    return result


# ---------------------------------------------------------------- the outer process


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = result["links"]
    labels = [f"{r['rate_mbit'] / 1000:g} Gbit/s" if r["rate_mbit"] else "unlimited" for r in links]
    x = range(len(links))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [r["full_s"] for r in links], "o-", label="full send (bf16, raw)")
    ax.plot(x, [r["sparse_s"] for r in links], "o-", label="sparse delta (fast level)")
    ax.plot(x, [r["auto_s"] for r in links], "x--", label="sync.mode=auto")
    ax.set_xticks(list(x), labels)
    ax.set_yscale("log")
    ax.set_ylabel("seconds, step done -> all receivers committed")
    ax.set_title(f"{result['model_params'] / 1e6:.0f}M-param GPT, {result['trainer_ranks']} trainer ranks -> "
                 f"{result['receivers']} receivers, {100 * result['change_fraction']:.1f}% changed")
    for i, r in enumerate(links):
        ax.annotate(f"{r['speedup']:.1f}x", (i, r["sparse_s"]), textcoords="offset points", xytext=(0, -14), ha="center")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _links_arg(rates: list[int | None]) -> str:
    """Link rates as --links takes them (0 = unlimited)."""
    return ",".join(str(r or 0) for r in rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a ~100M-param model and fewer publishes")
    p.add_argument("--out", default="bench/results/sync_cluster.json")
    p.add_argument("--publishes", type=int, default=None, help="sparse (and auto) publishes per link")
    p.add_argument("--full-publishes", type=int, default=None)
    p.add_argument("--part-mb", type=int, default=16)
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="optimizer steps (each published) before measuring (default 30; 1 with --updates synthetic)")
    p.add_argument("--updates", choices=("train", "synthetic"), default=None,
                   help="train: real AdamW steps at lr 1e-6 (~2 %% of the bf16 weights change per step here); "
                        "synthetic: --change-fraction of the weights moved by +-1 ulp (default: synthetic with "
                        "--quick, the bar's ~1 %% setting; train without)")
    p.add_argument("--change-fraction", type=float, default=0.01, help="with --updates synthetic")
    p.add_argument("--zero-stage", type=int, default=1, help="the trainer group's ZeRO stage (2 or 3 need less memory)")
    p.add_argument("--sparsity", choices=("none", "nm", "rigl"), default="none",
                   help="the trainer ranks' sparsifier (its defaults: 2:4 for nm, density 0.1 for rigl); "
                        "published weights are masked by it")
    p.add_argument("--receiver-nodes", type=int, default=1,
                   help="rollout nodes (1-4), each a Ray node in its own namespace behind its own link; "
                        "3 receivers spread over them, round robin")
    p.add_argument("--relay-fanout", type=int, default=1,
                   help="sync.relay_fanout: rollout nodes relay updates in a tree of this fan-out (0: no relay)")
    p.add_argument("--links", default=_links_arg(LINKS),
                   help="link rates to measure, Mbit/s, comma-separated (0 = unlimited)")
    p.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--lab", default="stb", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--heads", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--embd", type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.links = [int(r) or None for r in str(args.links).split(",")]
    except ValueError:
        p.error(f"--links must be comma-separated integers (Mbit/s, 0 = unlimited), got {args.links!r}")
    if not 1 <= args.receiver_nodes <= 4:
        p.error(f"--receiver-nodes must be 1 to 4, got {args.receiver_nodes}")
    if args.relay_fanout < 0:
        p.error(f"--relay-fanout must be >= 0, got {args.relay_fanout}")
    if args.layers is None:
        args.layers = 8 if args.quick else 24  # 12 * L * 1024^2: ~101M / ~302M parameters
    if args.updates is None:  # --quick measures the bar's setting (~1 % changed); the full run real steps
        args.updates = "synthetic" if args.quick else "train"
    if args.warmup_steps is None:
        args.warmup_steps = 1 if args.updates == "synthetic" else 30
    if args.updates == "synthetic" and args.zero_stage == 3:
        p.error("--updates synthetic moves the full weights a rank holds under ZeRO 0-2: use --updates train with --zero-stage 3")
    if args.publishes is None:
        args.publishes = 3 if args.quick else 5
    if args.full_publishes is None:
        args.full_publishes = 2 if args.quick else 3

    if args.driver:
        result = drive(args)
        Path(args.out).write_text(json.dumps(result, indent=1))
        return 0

    from bench.netlab import NetLab, NetLabUnavailable

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the namespaces and Ray nodes are removed
    out = Path(args.out)
    try:
        NetLab.check()
    except NetLabUnavailable as e:
        print(f"bench.sync_cluster skipped: {e}")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    procs = []
    with NetLab(args.lab, hosts=1 + args.receiver_nodes) as lab, tempfile.TemporaryDirectory(prefix="stb") as tmp_name:
        tmp = Path(tmp_name)
        head = f"{lab.ip['a']}:{PORT}"
        env = cluster_env()
        try:
            procs += start_cluster(lab, PORT, {"a": {TRAINER_RES: 4}, **{side: {rollout_resource(k): 4} for k, side in enumerate(lab.sides[1:])}},
                                   tmp, env, object_store_bytes=(3 if args.quick else 6) << 30)
            if len(procs) < len(lab.sides):
                print("bench.sync_cluster: the Ray nodes did not start (see the logs above)")
                return 1
            raw = tmp / "result.json"
            cmd = [sys.executable, "-m", "bench.sync_cluster", "--driver", f"--address={head}", f"--lab={args.lab}",
                   f"--out={raw}", f"--layers={args.layers}", f"--heads={args.heads}", f"--embd={args.embd}",
                   f"--publishes={args.publishes}", f"--full-publishes={args.full_publishes}", f"--part-mb={args.part_mb}", f"--warmup-steps={args.warmup_steps}", f"--updates={args.updates}",
                   f"--change-fraction={args.change_fraction}",
                   f"--zero-stage={args.zero_stage}", f"--links={_links_arg(args.links)}", f"--sparsity={args.sparsity}",
                   f"--receiver-nodes={args.receiver_nodes}", f"--relay-fanout={args.relay_fanout}"]
            rc = subprocess.run(lab.exec_in("a", cmd), timeout=5400, env=env).returncode
            if rc != 0 or not raw.exists():
                for log in ["head.log"] + [f"node_{side}.log" for side in lab.sides[1:]]:
                    print(f"--- {log}\n" + (tmp / log).read_text()[-3000:])
                print(f"bench.sync_cluster: the driver failed (exit {rc})")
                return 1
            result = json.loads(raw.read_text())
        finally:
            for proc in reversed(procs):
                stop_node(proc)
    out.write_text(json.dumps(result, indent=1) + "\n")
    png = out.with_suffix(".png")
    plot(result, png)
    print(f"wrote {out} and {png}")
    if not result.get("verified"):
        print("bench.sync_cluster: a receiver's re-read weights differed from the trainer's (see `verified`)")
    for r in result["links"]:
        rate = f"{r['rate_mbit']} Mbit/s" if r["rate_mbit"] else "unlimited"
        print(f"{rate:>14}: sparse {r['sparse_s']:.2f} s, full {r['full_s']:.2f} s ({r['speedup']:.1f}x), "
              f"auto {r['auto_s']:.2f} s ({r['auto_choice']}), wire {r['sparse_wire_bytes'] / 1e6:.1f} MB "
              f"for a {r['sparse_payload_bytes'] / 1e6:.1f} MB payload x {result['receivers']} receivers "
              f"on {result['receiver_nodes']} node(s); trainer egress {r['trainer_egress_bytes'] / 1e6:.1f} MB")
    return 0 if result.get("verified") else 1


if __name__ == "__main__":
    sys.exit(main())
