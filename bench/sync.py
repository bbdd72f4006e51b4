"""Benchmark of the sparse-delta weight codec (sync/): sizes, speeds, and what peers would ship.

    python -m bench.sync [--out FILE] [--quick]

Synthetic deltas: a bf16 state (100M elements; 4M with --quick) of N(0, 0.02) weights with
0.1 / 1 / 10 / 50 / 90 / 100 % of the elements changed the way real updates change them: the bit pattern
moves by +-1 ulp (70 %), +-2 (20 %), +-3..8 (9 %), and 1 % flip sign (the sign bit, plus a
small move, as near-zero weights do).
Real deltas: a small GPT is warmed up, then trained with fp32 AdamW masters at lr 1e-6, 1e-5,
1e-4 (fresh optimizer each), publishing bf16 weights after each of 3 steps; the first publish
after a fresh optimizer is included.

For each delta: payload size and ratio (dense bf16 bytes / payload) for levels fast and best;
encode and apply times and throughput (dense GB/s); zstd level 1 on the same dense bytes; the
i.i.d. entropy estimate n*H2(p) + changes*H(zigzag diff) and, for real deltas, the estimate
conditioned on (tensor, old exponent); and the payload peers ship: flat int32 positions +
bf16 values, zstd-compressed (level 3) and as an uncompressed safetensors file.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

BAR = {"ratio_0.1%": 1000, "ratio_1%": 130, "ratio_10%": 18, "ratio_50%": 1.0}
SYNTHETIC_FRACS = (0.001, 0.01, 0.1, 0.5, 0.9, 1.0)


def _timed(fn, reps: int):
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.int16).numpy()


# ---------------------------------------------------------------- reference numbers


def iid_estimate_bytes(old: dict, new: dict) -> float:
    """n*H2(p) + k*H(zigzag(new_bits - old_bits)) over all elements alike, in bytes."""
    n, k = 0, 0
    hist: dict[int, int] = {}
    for name in new:
        o, x = _bits(old[name]).astype(np.int32), _bits(new[name]).astype(np.int32)
        d = x - o
        d = d[d != 0]
        n += o.size
        k += d.size
        u, c = np.unique(d, return_counts=True)
        for a, b in zip(u.tolist(), c.tolist()):
            hist[a] = hist.get(a, 0) + b
    if k == 0:
        return 0.0
    p = k / n
    h2 = 0.0 if p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    probs = np.array(list(hist.values()), dtype=np.float64) / k
    return (n * h2 + k * float(-(probs * np.log2(probs)).sum())) / 8


def conditional_estimate_bytes(old: dict, new: dict) -> float:
    """Same, but p and the diff distribution taken per (tensor, old bf16 exponent)."""
    total = 0.0
    for name in new:
        o, x = _bits(old[name]).astype(np.int32), _bits(new[name]).astype(np.int32)
        e = (o >> 7) & 0xFF
        for ev in np.unique(e):
            sel = e == ev
            d = x[sel] - o[sel]
            n, dd = d.size, d[d != 0]
            k = dd.size
            if 0 < k < n:
                p = k / n
                total += n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
            if k:
                _, c = np.unique(dd, return_counts=True)
                c = c / k
                total += k * float(-(c * np.log2(c)).sum())
    return total / 8


def peer_payloads(old: dict, new: dict) -> dict:
    """What peers ship: int32 positions + bf16 values (per tensor, concatenated)."""
    from safetensors.torch import save

    idx, vals = [], []
    for name in new:
        o, x = _bits(old[name]), _bits(new[name])
        pos = np.nonzero(o != x)[0].astype(np.int32)
        idx.append(pos)
        vals.append(x[pos])
    idx_a, val_a = np.concatenate(idx), np.concatenate(vals)
    raw = idx_a.tobytes() + val_a.tobytes()
    z = zstandard.ZstdCompressor(level=3).compress(raw)
    st = save({"indices": torch.from_numpy(idx_a), "values": torch.from_numpy(val_a).view(torch.bfloat16)})
    return {"int32_values_zstd3_bytes": len(z), "int32_values_safetensors_bytes": len(st)}


# ---------------------------------------------------------------- measuring one delta


def measure(old: dict, new: dict, reps: int, levels=("fast", "best"), receiver_path: bool = True,
            level_reps: dict | None = None) -> dict:
    """Sizes and times of one delta. Timed steps are interleaved rep by rep (zstd-1, then each
    level's encode and applies) and the best of `reps` is kept, so a busy machine slows the
    reference and the codec alike. `level_reps` caps the reps of a level (best is slow at
    high change fractions, and its speed is not what is being compared there)."""
    level_reps = level_reps or {}
    from sync import codec
    from sync.receiver import WeightReceiver

    dense = sum(t.numel() * t.element_size() for t in new.values())
    dense_bytes = b"".join(_bits(new[k]).tobytes() for k in new)
    changes = sum(int(np.count_nonzero(_bits(old[k]) != _bits(new[k]))) for k in new)
    n = sum(t.numel() for t in new.values())
    iid = iid_estimate_bytes(old, new)
    row = {
        "elements": n, "changed": changes, "changed_frac": changes / n, "dense_bytes": dense,
        "iid_estimate_bytes": iid, "iid_estimate_ratio": dense / iid if iid else None,
    }
    row.update(peer_payloads(old, new))
    times: dict[str | tuple[str, str], list[float]] = {"zstd1_s": []}
    for level in levels:
        times.update({(level, "encode_s"): [], (level, "apply_s"): [], (level, "receiver_apply_s"): []})
    payloads: dict[str, list[bytes]] = {}
    for rep in range(reps):
        t, z = _timed(lambda: zstandard.ZstdCompressor(level=1).compress(dense_bytes), 1)
        times["zstd1_s"].append(t)
        row["zstd1_bytes"] = len(z)
        for level in levels:
            if rep >= level_reps.get(level, reps):
                continue
            t, buckets = _timed(lambda: codec.encode(old, new, base_version=0, target_version=1, level=level), 1)
            times[(level, "encode_s")].append(t)
            payloads[level] = buckets
            t, (got, _) = _timed(lambda: codec.apply(old, 0, buckets), 1)
            times[(level, "apply_s")].append(t)
            for k in new:  # the benchmark checks exactness too
                assert torch.equal(got[k].view(torch.int16), new[k].view(torch.int16)), k
            del got
            if receiver_path:
                # The Ray receiver's path: decode + verify into its warm shadow in place, then
                # replay the changed elements onto the target tensors.
                rec = WeightReceiver({k: v.clone() for k, v in old.items()}, version=0)
                t0 = time.perf_counter()
                rec.commit(rec.stage_buckets([buckets]))
                times[(level, "receiver_apply_s")].append(time.perf_counter() - t0)
                assert rec.version == 1
                del rec
    del dense_bytes
    row["zstd1_s"] = min(times["zstd1_s"])
    for level in levels:
        payload = sum(map(len, payloads[level]))
        enc_s, app_s = min(times[(level, "encode_s")]), min(times[(level, "apply_s")])
        r = {
            "payload_bytes": payload, "ratio": dense / payload, "encode_s": enc_s, "apply_s": app_s,
            "encode_GBps": dense / enc_s / 1e9, "apply_GBps": dense / app_s / 1e9,
            "vs_iid_estimate": payload / iid if iid else None,
            "vs_int32_values_zstd": row["int32_values_zstd3_bytes"] / payload,
        }
        if receiver_path:
            ra = min(times[(level, "receiver_apply_s")])
            r.update(receiver_apply_s=ra, receiver_apply_GBps=dense / ra / 1e9)
        row[level] = r
    return row


# ---------------------------------------------------------------- the deltas


def synthetic_pair(n: int, frac: float, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    old = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    new = old.clone()
    bits = new.view(torch.int16)
    k = int(round(n * frac))
    idx = torch.randperm(n, generator=g)[:k] if frac < 0.5 else torch.nonzero(torch.rand(n, generator=g) < frac).squeeze(1)
    k = idx.numel()
    r = torch.rand(k, generator=g)
    mag = torch.where(r < 0.7, 1, torch.where(r < 0.9, 2, torch.randint(3, 9, (k,), generator=g)))
    sign = torch.where(torch.rand(k, generator=g) < 0.5, -1, 1)
    step = (mag * sign).to(torch.int16)
    flips = torch.rand(k, generator=g) < 0.01
    v = bits[idx] + step
    v = torch.where(flips, v ^ torch.tensor(-0x8000, dtype=torch.int16), v)
    v = torch.where(v == bits[idx], v + 1, v)  # every selected element really changes
    bits[idx] = v
    return {"w": old}, {"w": new}


def _corpus() -> torch.Tensor:
    root = Path(__file__).resolve().parent.parent
    text = b"".join(p.read_bytes() for p in sorted(root.glob("*/*.py")))
    return torch.tensor(list(text), dtype=torch.long)


def real_deltas(quick: bool) -> list[tuple[str, dict, dict]]:
    from models import build_model
    from models.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=128, block_size=64) if quick else ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=128)
    model, _ = build_model(cfg)
    data = _corpus()
    g = torch.Generator().manual_seed(1)
    bs, T = 8, cfg.block_size

    def step(opt):
        i = torch.randint(0, data.numel() - T - 1, (bs,), generator=g)
        x = torch.stack([data[j : j + T] for j in i.tolist()])
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()

    warm = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(10 if quick else 40):
        step(warm)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    for lr in (1e-6, 1e-5, 1e-4):
        model.load_state_dict(start)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        publish = lambda: {k: v.detach().to(torch.bfloat16).clone() for k, v in model.named_parameters()}
        prev = publish()
        for s in range(3):
            step(opt)
            cur = publish()
            out.append((f"lr{lr:g}_publish{s + 1}" + ("_fresh_optimizer" if s == 0 else ""), prev, cur))
            prev = cur
    return out


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    from launch.env import set_runtime_defaults

    set_runtime_defaults()
    ap = argparse.ArgumentParser(prog="python -m bench.sync")
    ap.add_argument("--out", default="bench/results/sync.json")
    ap.add_argument("--quick", action="store_true", help="4M-element synthetic state, smaller model")
    args = ap.parse_args(argv)
    n = 4_000_000 if args.quick else 100_000_000
    reps = 2 if args.quick else 3
    result: dict[str, Any] = {"machine": {"threads": torch.get_num_threads()}, "synthetic": {}, "real": {}, "bar": {}}
    print(f"{'delta':34s} {'changed':>8s} {'fast':>8s} {'best':>8s} {'iid est':>8s} {'i32+v zstd':>10s} "
          f"{'enc fast':>9s} {'app fast':>9s} {'recv app':>9s} {'zstd-1':>8s}")

    def show(name, r):
        f, b = r.get("fast", {}), r.get("best", {})
        print(f"{name:34s} {100 * r['changed_frac']:7.2f}% {f.get('ratio', 0):7.1f}x {b.get('ratio', 0):7.1f}x "
              f"{(r['iid_estimate_ratio'] or 0):7.1f}x {r['dense_bytes'] / r['int32_values_zstd3_bytes']:9.1f}x "
              f"{f.get('encode_s', 0):8.3f}s {f.get('apply_s', 0):8.3f}s {f.get('receiver_apply_s', 0):8.3f}s {r['zstd1_s']:7.3f}s")

    for frac in SYNTHETIC_FRACS:
        old, new = synthetic_pair(n, frac)
        r = measure(old, new, reps, level_reps={"best": 1} if frac >= 0.9 else None)
        del old, new
        name = f"synthetic_{100 * frac:g}%"
        result["synthetic"][name] = r
        show(name, r)
    for name, old, new in real_deltas(args.quick):
        r = measure(old, new, 1, receiver_path=False)  # small states: sizes matter here, not speed
        r["conditional_estimate_bytes"] = conditional_estimate_bytes(old, new)
        r["conditional_estimate_ratio"] = r["dense_bytes"] / r["conditional_estimate_bytes"]
        result["real"][name] = r
        show(name, r)

    bar = result["bar"]
    syn = result["synthetic"]
    for key, want in BAR.items():
        pct = key.split("_")[1]
        got = min(syn[f"synthetic_{pct}"][lvl]["ratio"] for lvl in ("fast", "best"))
        bar[key] = {"value": got, "need": f"> {want}" if want == 1.0 else f">= {want}", "pass": got > want if want == 1.0 else got >= want}
    one = syn["synthetic_1%"]
    for what in ("encode_s", "receiver_apply_s", "apply_s"):
        bar[f"fast_{what}_vs_zstd1_at_1%"] = {"value": one["fast"][what], "need": f"< zstd-1 {one['zstd1_s']:.3f}s",
                                              "pass": one["fast"][what] < one["zstd1_s"]}
    real = result["real"].values()
    worst_best = max(r["best"]["vs_iid_estimate"] for r in real)
    worst_fast = max(r["fast"]["vs_iid_estimate"] for r in real)
    bar["best_vs_iid_estimate_real_worst"] = {"value": worst_best, "need": f"<= {1 / 1.2:.3f}", "pass": worst_best <= 1 / 1.2}
    bar["fast_vs_iid_estimate_real_worst"] = {"value": worst_fast, "need": f"<= {1 / 0.95:.3f}", "pass": worst_fast <= 1 / 0.95}
    worst_peer = min(min(r[l]["vs_int32_values_zstd"] for l in ("fast", "best")) for r in real)
    bar["real_smaller_than_int32_values_zstd_worst"] = {"value": worst_peer, "need": ">= 3", "pass": worst_peer >= 3}
    syn_peer = min(min(r[l]["vs_int32_values_zstd"] for l in ("fast", "best")) for r in syn.values())
    result["synthetic_smaller_than_int32_values_zstd_worst"] = syn_peer
    # Level fast (the Ray path) at every change fraction: never slower than zstd-1 on the dense bytes.
    speed = result["fast_vs_zstd1"] = {}
    print("\nfast vs zstd-1 on the same dense bytes (time ratio < 1: fast is faster):")
    for name, r in syn.items():
        f, z = r["fast"], r["zstd1_s"]
        line = {"zstd1_s": z, "encode_s": f["encode_s"], "apply_s": f["apply_s"],
                "receiver_apply_s": f["receiver_apply_s"], "encode_over_zstd1": f["encode_s"] / z,
                "apply_over_zstd1": f["apply_s"] / z, "receiver_apply_over_zstd1": f["receiver_apply_s"] / z}
        line["encode_beats_zstd1"] = f["encode_s"] < z
        line["apply_beats_zstd1"] = f["apply_s"] < z and f["receiver_apply_s"] < z
        speed[name] = line
        print(f"  {name:18s} encode {f['encode_s']:.3f}s ({line['encode_over_zstd1']:.2f}x) "
              f"apply {f['apply_s']:.3f}s ({line['apply_over_zstd1']:.2f}x) recv apply {f['receiver_apply_s']:.3f}s "
              f"({line['receiver_apply_over_zstd1']:.2f}x) vs zstd-1 {z:.3f}s: encode "
              f"{'BEATS' if line['encode_beats_zstd1'] else 'LOSES TO'} zstd-1, apply "
              f"{'BEATS' if line['apply_beats_zstd1'] else 'LOSES TO'} zstd-1")
    bar["fast_beats_zstd1_every_fraction"] = {"value": float(all(v["encode_beats_zstd1"] and v["apply_beats_zstd1"] for v in speed.values())),
                                              "need": "1 (encode & apply, all)", "pass": all(v["encode_beats_zstd1"] and v["apply_beats_zstd1"] for v in speed.values())}
    print("\nbar:" + (" (quick run: 4M elements and a tiny model, indicative only; the bar is defined on the full run)" if args.quick else ""))
    result["quick"] = args.quick
    for k, v in bar.items():
        print(f"  {k:42s} {v['value']:10.4g}  need {v['need']:22s} {'PASS' if v['pass'] else 'FAIL'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
