"""bench.sync_cluster's network lab: without the rights to make network namespaces the benchmark
says why and skips (exit 0) instead of failing obscurely; with them, two hosts reach each other
only across the veth pair, through the rate limit we set, and everything is removed afterwards."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bench import lab_ray, netlab, sync_cluster
from bench.netlab import NetLab, NetLabUnavailable
from tiny_policy import published_tiny_policy


def test_without_root_the_benchmark_skips_with_the_reason(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 1000)
    with pytest.raises(NetLabUnavailable, match="root"):
        NetLab.check()
    out = tmp_path / "r.json"
    assert sync_cluster.main(["--quick", "--out", str(out)]) == 0
    assert "skipped: network namespaces need root" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.parametrize("hosts", [2, 3])  # 3: each host on its own link to a switch
def test_lab_link_counts_bytes_obeys_the_rate_limit_and_is_removed(tmp_path, hosts):
    try:
        NetLab.check()
    except NetLabUnavailable as e:
        pytest.skip(str(e))
    lab = NetLab("stbt", "10.233.0", hosts=hosts)
    size = 4 << 20
    server = "import socket,sys,time;s=socket.socket();s.bind((sys.argv[1],7001));s.listen();c,_=s.accept();n=0;t=time.time()\n" \
             "while (b:=c.recv(1<<16)): n+=len(b)\nprint(n, time.time()-t)"
    client = f"import socket,sys;s=socket.create_connection((sys.argv[1],7001),timeout=10);s.sendall(b'x'*{size});s.close()"
    with lab:
        lab.limit(20)  # 20 Mbit/s: 4 MiB take ~1.7 s
        srv = subprocess.Popen(lab.exec_in("b", [sys.executable, "-c", server, lab.ip["b"]]), stdout=subprocess.PIPE, text=True)
        import time

        time.sleep(1.0)
        before = lab.tx_bytes()
        subprocess.run(lab.exec_in("a", [sys.executable, "-c", client, lab.ip["b"]]), check=True, timeout=60)
        received, seconds = srv.communicate(timeout=60)[0].split()
        sent = lab.tx_bytes()["a"] - before["a"]
        assert int(received) == size
        assert size <= sent < 1.1 * size  # the payload plus TCP/IP headers
        assert float(seconds) > 1.2  # tbf shaped it (an unlimited veth takes milliseconds)
        if hosts == 3:  # the third host is reachable through the switch as well
            srv = subprocess.Popen(lab.exec_in("a", [sys.executable, "-c", server, lab.ip["a"]]), stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)
            subprocess.run(lab.exec_in("c", [sys.executable, "-c", client, lab.ip["a"]]), check=True, timeout=60)
            assert int(srv.communicate(timeout=60)[0].split()[0]) == size
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(f"stbt_{side}" in names for side in ("a", "b", "c", "hub"))


@pytest.mark.ray
def test_the_benchmarks_check_rereads_every_receivers_weights_and_catches_an_altered_one(ray_cluster):
    """`verified` comes from each receiver's weights read again, not from digests cached at
    commit: one bit flipped behind a receiver's back makes that receiver fail the check while
    its cached checksum still says it matches."""
    import ray

    from sync.checksum import state_checksum

    mc, state, pub = published_tiny_policy(1)
    receivers = [ray.remote(sync_cluster.BenchReceiver).options(num_cpus=0.1).remote(mc) for _ in range(3)]
    try:
        ray.get([r.apply.remote(pub.update_for(None)) for r in receivers])
        assert sync_cluster.reread_verified(receivers, pub.state_checksum()) == [True] * 3
        ray.get(receivers[2].alter.remote("h.0.mlp.c_fc.weight", 5))
        assert sync_cluster.reread_verified(receivers, pub.state_checksum()) == [True, True, False]
        assert pub.state_checksum() == state_checksum(state)
    finally:
        for r in receivers:
            ray.kill(r)


def test_the_publish_peak_sees_memory_freed_before_the_block_ends():
    """PeakRss reads the kernel's high-water mark, reset at the start: 64 MiB touched and freed
    inside the block count, whenever it happened between samples."""
    import numpy as np

    peak = sync_cluster.PeakRss()
    peak.start()
    a = np.ones(64 << 20, np.uint8)  # touched: resident
    del a
    grown = peak.stop()
    if peak._sampler is not None:
        pytest.skip("/proc/self/clear_refs refused here: PeakRss samples instead")
    assert grown >= 60 << 20
    peak.start()
    assert peak.stop() < 32 << 20  # a fresh block starts from the current RSS, not the old peak


def test_the_benchmark_cluster_has_one_auth_setting_whatever_the_callers_environment():
    """Every Ray process of the benchmark gets token mode and one fresh token, so a token file
    left in ~/.ray (or a caller's RAY_AUTH_* settings) cannot split head and node."""
    env = lab_ray.cluster_env({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": "/x/auth_token", "PATH": "/bin"})
    assert env["RAY_AUTH_MODE"] == "token" and len(env["RAY_AUTH_TOKEN"]) == 64
    assert "RAY_AUTH_TOKEN_PATH" not in env and env["PATH"] == "/bin"
    assert lab_ray.cluster_env({})["RAY_AUTH_TOKEN"] != env["RAY_AUTH_TOKEN"]
