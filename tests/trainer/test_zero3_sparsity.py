"""Sparse methods under DeepSpeed ZeRO-3: two data-parallel ranks (spawned processes, gloo, CPU)
whose weights are really partitioned (tests/trainer/zero3_ranks.py) must

- end with identical masks on both ranks,
- publish weights that are exactly N:M / exactly at the layer's budget, pruned entries exactly 0,
- compute what ONE rank computes on both ranks' rows (fp32: same masks, weights within 1e-5),
- resume from a ZeRO-3 checkpoint and continue identically,
- expose their local fp32 partitions (ParamAccess.local_partition) so that the partitions tile
  each parameter and partition x mask slice == the published slice, padding included.
"""
from __future__ import annotations

import pytest
import torch
from near_ties import assert_same_nm_masks_up_to_near_ties
from zero3_ranks import reference_run, run_two_ranks

from trainer.distributed import free_port
from trainer.param_access import partition_range

SMALL = dict(n_layer=1, n_head=2, n_embd=32, block_size=32)
ODD = dict(n_layer=1, n_head=3, n_embd=9, block_size=32)  # wte has 259 * 9 elements: rank 1's partition is padded


def nm_case(**sparsity) -> dict:
    return dict(model=SMALL, total_steps=6, steps=4, sparsity={"method": "nm", "n": 2, "m": 4, **sparsity})


def dst_case(method: str, model: dict = SMALL, **sparsity) -> dict:
    return dict(model=model, total_steps=6, steps=4,
                sparsity=dict(method=method, density=0.3, update_interval=2, end_fraction=1.0, **sparsity))


def check_identical_masks(ranks: list[dict]) -> dict:
    layers = ranks[0]["sparsity"]["layers"]
    assert layers, "no sparsified layer"
    for name, layer in layers.items():
        assert layer["mask"] is not None, f"{name}: no mask"
        assert torch.equal(layer["mask"], ranks[1]["sparsity"]["layers"][name]["mask"]), f"{name}: the ranks' masks differ"
    return layers


def check_pattern(case: dict, ranks: list[dict]) -> None:
    layers = check_identical_masks(ranks)
    published = ranks[0]["published"]
    assert ranks[1]["published"] == {}  # rank 0 returns the tensors
    sparsity = case["sparsity"]
    for name, layer in layers.items():
        weight, mask = published[name], layer["mask"]
        assert weight.shape == mask.shape and weight.dtype == torch.float32
        assert torch.count_nonzero(weight[~mask]) == 0, f"{name}: pruned weights are not exactly 0"
        if sparsity["method"] == "nm":
            n, m = layer["extra"]["current"]
            per_group = mask.reshape(mask.shape[0], -1, m).sum(-1)  # nn.Linear [out, in]: groups along in
            assert bool((per_group == n).all()), f"{name}: the mask is not {n}:{m}"
            assert bool(((weight.reshape(weight.shape[0], -1, m) != 0).sum(-1) <= n).all())
        elif sparsity["method"] in ("rigl", "set", "static"):
            assert int(mask.sum()) == layer["extra"]["active"] == max(1, round(layer["extra"]["density"] * mask.numel()))


def check_matches_one_rank(case: dict, ranks: list[dict]) -> None:
    reference = reference_run(case, free_port())
    agree = {}
    for name, layer in ranks[0]["sparsity"]["layers"].items():
        ref_mask, master = reference["sparsity"]["layers"][name]["mask"], ranks[0]["masters"][name]
        if case["sparsity"]["method"] == "nm":
            # The ranks sum their gradients in another order than one rank does, so the masters differ by
            # some d (within the tolerance): the last masks, chosen from them, may swap two weights within 2d.
            torch.testing.assert_close(master, reference["masters"][name], atol=1e-5, rtol=1e-4)
            d = float((master - reference["masters"][name]).abs().max())
            n, m = layer["extra"]["current"]
            assert_same_nm_masks_up_to_near_ties(layer["mask"], ref_mask, master, n, m, 1, tie=2 * d)
        else:  # (RigL grows by |gradient|, which the ranks do not record: no near-tie to check a flip against)
            assert torch.equal(layer["mask"], ref_mask), f"{name}: mask differs from one rank's"
        agree[name] = layer["mask"] == ref_mask
    for name, value in reference["published"].items():
        where = agree.get(name, torch.ones_like(value, dtype=torch.bool))  # a flipped weight is 0 in one of them
        torch.testing.assert_close(ranks[0]["published"][name][where], value[where], atol=1e-5, rtol=1e-4)
    losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert losses == pytest.approx(reference["losses"], rel=1e-5)


def check_local_partitions(ranks: list[dict]) -> None:
    """The partitions tile [0, numel) in rank order, hold the master's values, and partition x the
    mask's slice is exactly the published slice: what a rank needs to publish its own share."""
    layers = ranks[0]["sparsity"]["layers"]
    for name, master in ranks[0]["masters"].items():
        numel, cursor = master.numel(), 0
        for rank, result in enumerate(ranks):
            start, end, fp32, share = result["partitions"][name]
            assert (start, end) == partition_range(numel, 2, rank) and start == cursor, name
            cursor = end
            assert fp32.dtype == torch.float32 and fp32.shape == (end - start,)
            assert torch.equal(fp32, result["masters"][name].reshape(-1)[start:end]), f"{name}: rank {rank}"
            mask = layers[name]["mask"].reshape(-1)[start:end] if name in layers else torch.ones(end - start, dtype=torch.bool)
            assert torch.equal(ranks[0]["published"][name].reshape(-1)[start:end], fp32 * mask), f"{name}: rank {rank}"
            assert torch.equal(share, fp32 * mask)  # LocalPartition.masked
        assert cursor == numel, f"{name}: partitions cover {cursor} of {numel} elements"
        assert ranks[0]["partitioned"][name], f"{name} was not partitioned: the test would not exercise ZeRO-3"


def test_partition_range_is_deepspeeds_padded_split():
    assert [partition_range(2331, 2, r) for r in range(2)] == [(0, 1166), (1166, 2331)]
    assert [partition_range(5, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]
    assert [partition_range(8, 2, r) for r in range(2)] == [(0, 4), (4, 8)]


def test_nm_and_rigl_train_under_zero3_like_one_rank(tmp_path):
    cases = [nm_case(estimator="sr_ste") | {"resume_at": 2, "frozen_copy": True},
             dst_case("rigl", model=ODD) | {"probe_set": "wte.weight"}]
    results = run_two_ranks(cases, tmp_path)
    for case, ranks in zip(cases, results):
        check_pattern(case, ranks)
        check_local_partitions(ranks)
        check_matches_one_rank(case, ranks)
    layers = results[1][0]["sparsity"]["layers"]
    assert sum(int((layer["mask"] != layer["initial_mask"]).sum()) for layer in layers.values()) > 0, "RigL never updated"

    # Resuming the N:M run from its ZeRO-3 checkpoint at step 2 reproduces steps 2-3 exactly.
    for rank in range(2):
        full, resumed = results[0][rank], results[0][rank]["resumed"]
        assert resumed["losses"] == full["losses"][2:]
        for name, layer in full["sparsity"]["layers"].items():
            assert torch.equal(resumed["sparsity"]["layers"][name]["mask"], layer["mask"])
        for name, value in full["masters"].items():
            assert torch.equal(resumed["masters"][name], value), name

    # The frozen copy (the RL KL reference) computes exactly what the ZeRO-3 engine computes.
    for rank in range(2):
        probe = results[0][rank]["frozen_copy"]
        assert not probe["copy_is_partitioned"] and torch.equal(probe["copy"], probe["engine"])

    # ParamAccess.set / reset_optimizer_state on a padded partition, then what a forward gathers.
    for rank in range(2):
        probe = results[1][rank]["probe_set"]
        value, positions = probe["value"], probe["positions"]
        assert torch.equal(probe["master"], value)
        assert torch.equal(probe["working"], value)  # the working partition was updated too
        for key, before in probe["moments_before"].items():
            after = probe["moments_after"][key]
            assert torch.count_nonzero(after[positions]) == 0
            assert torch.equal(after[~positions], before[~positions]) and torch.count_nonzero(before[~positions]) > 0


@pytest.mark.slow
def test_every_method_under_zero3(tmp_path):
    fp32 = [nm_case(estimator="ste"), nm_case(gradient_flow="mdgf_linear", decay_coef=0.2),
            nm_case(gradient_flow="sdgf", n=1, m=4), dst_case("set"), dst_case("static", init="magnitude"),
            dict(model=SMALL, total_steps=6, steps=4,
                 sparsity=dict(method="magnitude", density=0.3, prune_interval=1, prune_end_fraction=0.5))]
    bf16 = [nm_case(estimator="sr_ste") | {"precision": "bf16"}, dst_case("rigl") | {"precision": "bf16"}]
    results = run_two_ranks(fp32 + bf16, tmp_path)
    for case, ranks in zip(fp32 + bf16, results):
        check_pattern(case, ranks)
        check_local_partitions(ranks)
        if case.get("precision", "fp32") == "fp32":  # bf16 rounds differently on one rank
            check_matches_one_rank(case, ranks)
    magnitude = results[5][0]["sparsity"]["layers"]
    for layer in magnitude.values():  # the schedule ended at step 3: every layer at its target
        assert int(layer["mask"].sum()) == max(1, round(layer["extra"]["density"] * layer["mask"].numel()))
