"""Process-group set-up from torchrun, SLURM, or nothing (one process).

Order of precedence: torchrun/submitit variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), then SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the
first host of SLURM_JOB_NODELIST as master, a port derived from SLURM_JOB_ID), else a
single process. Backend: nccl on CUDA, gloo on CPU. A single process creates no process
group at all (nothing to talk to, no port to collide with other runs).

A rank that dies must not leave the others hanging: the process group is created with a
timeout (``DINO_LOCAT_DIST_TIMEOUT_S``, default 600 s) that bounds both the start-up
rendezvous and every collective, and errors name the rank and node that saw them.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
# What gloo/NCCL/the rendezvous store say when another rank has gone away or stopped answering.
PEER_FAILURE_MARKS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out",
    "timed out",
    "Socket Timeout",
    "NCCL communicator was aborted",
)


# Node of every rank of the process group, gathered once when it is formed (for error messages).
_rank_nodes: list[str] = []


class DistributedError(RuntimeError):
    """A process group could not be formed, or a collective failed because a rank is gone."""


def node_name() -> str:
    """This process's node: SLURM's name for it when under SLURM, else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def timeout_s(env: Mapping[str, str] | None = None) -> float:
    """Seconds the rendezvous and each collective may wait (``DINO_LOCAT_DIST_TIMEOUT_S``)."""
    env = os.environ if env is None else env
    text = env.get("DINO_LOCAT_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError as err:
        raise ValueError(f"DINO_LOCAT_DIST_TIMEOUT_S={text!r} is not a number of seconds") from err
    if value <= 0:
        raise ValueError(f"DINO_LOCAT_DIST_TIMEOUT_S={text!r} must be positive")
    return value


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single process"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def parse_first_host(nodelist: str) -> str:
    """First host of a compressed SLURM node list (``gpu[003-005,009],cpu1`` -> ``gpu003``)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``scontrol show hostnames`` when it is installed
    (it knows every syntax), else :func:`parse_first_host`."""
    if shutil.which("scontrol"):
        try:
            hosts = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if hosts:
                return hosts[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return parse_first_host(nodelist)


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as err:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from err


def resolve_environment(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read the rank layout from ``env`` (default ``os.environ``) without touching torch."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
            source="torchrun/env",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world_size = _int(env, "SLURM_NTASKS")
        job_id = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=world_size,
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=_int(env, "MASTER_PORT")
            if "MASTER_PORT" in env
            else 10000 + job_id % 20000,
            source="SLURM",
        )
    return DistEnv()


def init_distributed(env: DistEnv | None = None) -> tuple[DistEnv, torch.device]:
    """Join the process group (if more than one process) and pick this rank's device."""
    env = resolve_environment() if env is None else env
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if env.world_size > 1 and not dist.is_initialized():
        limit = timeout_s()
        address = f"tcp://{env.master_addr}:{env.master_port}"
        try:
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo",
                init_method=address,
                rank=env.rank,
                world_size=env.world_size,
                timeout=datetime.timedelta(seconds=limit),
            )
        except (RuntimeError, ValueError) as err:
            raise DistributedError(
                f"rank {env.rank} of {env.world_size} on node {node_name()}: could not form the "
                f"process group at {address} within {limit:g} s (DINO_LOCAT_DIST_TIMEOUT_S): "
                f"{err}. Another rank did not start or cannot reach the master; see its log."
            ) from err
        nodes: list[str] = [""] * env.world_size
        dist.all_gather_object(nodes, node_name())
        _rank_nodes[:] = nodes
    return env, device


def is_peer_failure(err: BaseException) -> bool:
    """True when ``err`` says that another rank died or stopped answering."""
    if isinstance(err, DistributedError | dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(mark in str(err) for mark in PEER_FAILURE_MARKS)


def describe_peer_failure(err: BaseException, rank: int, world_size: int) -> str:
    """The one-line story of a lost peer, from the side of the rank that noticed it."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    nodes = _rank_nodes if len(_rank_nodes) == world_size else ["?"] * world_size
    others = ", ".join(f"{r} on {nodes[r]}" for r in range(world_size) if r != rank)
    return (
        f"rank {rank} of {world_size} on node {node_name()}: another rank (of {others}) died "
        f"or stopped answering: {first}"
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()
