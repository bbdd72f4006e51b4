"""Process-group plumbing for one data-parallel rank: addresses, ports, env vars, device."""
from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    """A TCP port that was free a moment ago on this host (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """This node's IP as Ray sees it (so other nodes can reach rank 0), else loopback."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return "127.0.0.1"


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:  # pragma: no cover
        pass
    return None


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible to this process, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but this process sees no CUDA device "
                           "(on Ray, give trainers a GPU: cluster.gpus_per_trainer=1)")
    return device


def set_distributed_env(rank: int, world_size: int, master_addr: str, master_port: int, device: str) -> None:
    """The variables torch.distributed's env:// init and DeepSpeed read. LOCAL_RANK is 0: Ray
    gives each GPU actor its own CUDA_VISIBLE_DEVICES, so every rank sees its GPU as device 0."""
    os.environ.update({
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
        "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0", "LOCAL_SIZE": "1",
        "DS_ACCELERATOR": "cuda" if device == "cuda" else "cpu",
    })
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        # gloo binds to the address the hostname resolves to, which on a multi-homed host (or
        # inside a network namespace) may not be the one the ranks reach each other on: use the
        # interface that holds this node's Ray address.
        ifname = interface_of(node_ip())
        if ifname is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname


def interface_of(ip: str) -> str | None:
    """The network interface holding IPv4 address `ip`, if any."""
    import socket

    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def unlink_shm_buffer(rank: int) -> None:
    """Remove the name of this rank's DeepSpeed CPU allreduce buffer from /dev/shm.

    DeepSpeed's shm comm op creates one ~66 MB buffer per rank and removes it only on a clean
    exit, so every rank Ray kills (trainer restarts, shutdown, tests) leaves one behind until
    the machine runs out of /dev/shm. Once every rank has mapped every buffer (the caller holds
    a barrier after init), the names are no longer needed: the memory stays mapped until the
    last rank exits, however it exits, and is freed then."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{rank}"
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # ranks on several nodes (no shm op), or not on CPU
        pass


def destroy_distributed() -> None:
    """Leave the process group and forget DeepSpeed's cached groups of it.

    DeepSpeed keeps module-level handles to the groups it cloned from the first process group
    (deepspeed.utils.groups); after `destroy_process_group` they point at a dead group, and a
    later TrainerWorker in the same process (tests, notebooks) would fail inside
    `deepspeed.initialize`. So they are reset with it."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if name.startswith("_") and "GROUP" in name and not callable(value):
            setattr(groups, name, {} if isinstance(value, dict) else None)
