"""A small network inside this machine: Linux network namespaces (hosts) with `tc` rate limits
on their links and byte counters read from the interfaces.

    with NetLab("stb") as lab:                 # namespaces stb_a (10.231.0.1), stb_b (10.231.0.2)
        lab.limit(100)                         # 100 Mbit/s each way (None: unlimited)
        before = lab.tx_bytes()                # bytes each host has sent
        subprocess.run(lab.exec_in("a", [...]))

With one other host (`hosts=2`, the default) host a and host b are joined by one veth pair. With
more (`hosts=4`: a, b, c, d) every host has its own link to a switch (a bridge in namespace
<prefix>_hub), each link limited both ways: a host's sending is bounded by its own link however
many others it serves, as on a cluster whose nodes have one NIC each.

Needs root (CAP_NET_ADMIN); `NetLab.check()` says why not, so a caller can skip cleanly. Every
address lives inside the namespaces this code creates; exit removes them (and the veth pair
with them), also after an error.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess


class NetLabUnavailable(RuntimeError):
    """Network namespaces or tc cannot be used here (not root, no `ip`/`tc`, not permitted)."""


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise NetLabUnavailable(f"{' '.join(cmd)} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out


class NetLab:
    def __init__(self, prefix: str = "stb", subnet: str = "10.231.0", hosts: int = 2):
        if not 2 <= hosts <= 8:
            raise ValueError(f"NetLab needs 2 to 8 hosts, got {hosts}")
        self.sides = "abcdefgh"[:hosts]
        self.ns = {s: f"{prefix}_{s}" for s in self.sides}
        self.dev = {s: f"{prefix}-v{s}" for s in self.sides}
        self.ip = {s: f"{subnet}.{k + 1}" for k, s in enumerate(self.sides)}
        self.hub = f"{prefix}_hub" if hosts > 2 else None
        self.port = {s: f"{prefix}-h{s}" for s in self.sides}  # a host's link end in the hub
        self.rate_mbit: float | None = None

    @staticmethod
    def check() -> None:
        """Raise NetLabUnavailable with the reason when namespaces cannot be made here."""
        if os.geteuid() != 0:
            raise NetLabUnavailable("network namespaces need root (CAP_NET_ADMIN); run the benchmark as root")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise NetLabUnavailable(f"`{tool}` is not installed (iproute2)")
        probe = f"stbprobe{os.getpid()}"
        _run(["ip", "netns", "add", probe])
        _run(["ip", "netns", "del", probe], check=False)

    def __enter__(self) -> "NetLab":
        self.check()
        self.close()  # leftovers of an earlier run that was killed
        try:
            for side in self.sides:
                _run(["ip", "netns", "add", self.ns[side]])
                _run(["ip", "-n", self.ns[side], "link", "set", "lo", "up"])
            if self.hub is None:
                _run(["ip", "link", "add", self.dev["a"], "netns", self.ns["a"], "type", "veth",
                      "peer", "name", self.dev["b"], "netns", self.ns["b"]])
            else:
                _run(["ip", "netns", "add", self.hub])
                _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
                _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
                for side in self.sides:
                    _run(["ip", "link", "add", self.dev[side], "netns", self.ns[side], "type", "veth",
                          "peer", "name", self.port[side], "netns", self.hub])
                    _run(["ip", "-n", self.hub, "link", "set", self.port[side], "master", "br0"])
                    _run(["ip", "-n", self.hub, "link", "set", self.port[side], "up"])
            for side in self.sides:
                _run(["ip", "-n", self.ns[side], "addr", "add", f"{self.ip[side]}/24", "dev", self.dev[side]])
                _run(["ip", "-n", self.ns[side], "link", "set", self.dev[side], "up"])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for ns in [*self.ns.values(), *([self.hub] if self.hub else [])]:
            _run(["ip", "netns", "del", ns], check=False)

    def _link_ends(self) -> list[tuple[str, str]]:
        """(namespace, device) of every end whose sending a limit shapes: each host's own, and
        with a hub each hub port (what the switch sends to that host)."""
        ends = [(self.ns[s], self.dev[s]) for s in self.sides]
        if self.hub is not None:
            ends += [(self.hub, self.port[s]) for s in self.sides]
        return ends

    def limit(self, rate_mbit: float | None) -> None:
        """Rate-limit both directions of every link (a token bucket per end); None removes it."""
        for ns, dev in self._link_ends():
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
            if rate_mbit is not None:
                # burst: ~2 ms at the rate (at least 64 KiB) so the bucket shapes, not buffers
                burst = max(64 * 1024, int(rate_mbit * 1e6 / 8 * 0.002))
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                      "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "200ms"])
        self.rate_mbit = rate_mbit

    def cut(self) -> None:
        """Drop every packet on every link, both ways, until limit() is called again: a token
        bucket whose burst (32 bytes) is smaller than any frame drops each one (the machine's
        kernel may lack netem and packet filters). Peers see silence, not a closed connection."""
        for ns, dev in self._link_ends():
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                  "rate", "8bit", "burst", "32", "limit", "1"])

    def tx_bytes(self) -> dict[str, int]:
        """Bytes each host's interface has sent so far (the wire, headers included)."""
        out = {}
        for side in self.sides:
            info = json.loads(_run(["ip", "-n", self.ns[side], "-s", "-j", "link", "show", "dev", self.dev[side]]).stdout)
            out[side] = int(info[0]["stats64"]["tx"]["bytes"])
        return out

    def exec_in(self, side: str, cmd: list[str]) -> list[str]:
        """`cmd` prefixed to run inside namespace `side`."""
        return ["ip", "netns", "exec", self.ns[side], *cmd]
