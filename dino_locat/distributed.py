"""Process-group set-up from torchrun, SLURM, or nothing (one process).

Order of precedence: torchrun/submitit variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), then SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the
first host of SLURM_JOB_NODELIST as master, a port derived from SLURM_JOB_ID), else a
single process. Backend: nccl on CUDA, gloo on CPU. A single process creates no process
group at all (nothing to talk to, no port to collide with other runs).

A rank that dies must not leave the others hanging: the process group is created with a
timeout (``DINO_LOCAT_DIST_TIMEOUT_S``, default 600 s) that bounds both the start-up
rendezvous and every collective, and errors name the rank and node that saw them.

Work that only rank 0 does (writing a checkpoint, logs, figures) may take longer than that:
the other ranks wait for it in :func:`wait_for_main`, a barrier of its own (gloo, also next
to nccl) whose timeout is ``DINO_LOCAT_MAIN_WAIT_S`` (default: an hour, or the collective
timeout if that is longer). A rank that dies ends the wait at once, on every rank.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAIN_WAIT_S = 3600.0
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


@dataclass
class _MainWait:
    """The gloo group in which the other ranks wait for rank 0's own work, and its timeout."""

    group: dist.ProcessGroup | None = None
    seconds: float = DEFAULT_MAIN_WAIT_S


_main_wait = _MainWait()


class DistributedError(RuntimeError):
    """A process group could not be formed, or a collective failed because a rank is gone."""


def node_name() -> str:
    """This process's node: SLURM's name for it when under SLURM, else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, str(default))
    try:
        value = float(text)
    except ValueError as err:
        raise ValueError(f"{name}={text!r} is not a number of seconds") from err
    if value <= 0:
        raise ValueError(f"{name}={text!r} must be positive")
    return value


def timeout_s(env: Mapping[str, str] | None = None) -> float:
    """Seconds the rendezvous and each collective may wait (``DINO_LOCAT_DIST_TIMEOUT_S``)."""
    env = os.environ if env is None else env
    return _seconds(env, "DINO_LOCAT_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)


def main_wait_s(env: Mapping[str, str] | None = None) -> float:
    """Seconds the other ranks wait for rank 0's own work (``DINO_LOCAT_MAIN_WAIT_S``;
    default an hour, or :func:`timeout_s` when that is longer)."""
    env = os.environ if env is None else env
    default = max(DEFAULT_MAIN_WAIT_S, timeout_s(env))
    return _seconds(env, "DINO_LOCAT_MAIN_WAIT_S", default)


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


def init_distributed(
    env: DistEnv | None = None, timeout: float | None = None
) -> tuple[DistEnv, torch.device]:
    """Join the process group (if more than one process) and pick this rank's device.

    ``timeout`` (seconds; default :func:`timeout_s`) bounds the wait for the other ranks, at
    start-up and in every collective afterwards, so a rank that died turns into an error on
    the others instead of a hang.
    """
    env = resolve_environment() if env is None else env
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if env.world_size > 1 and not dist.is_initialized():
        limit = timeout_s() if timeout is None else timeout
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
        _main_wait.seconds = main_wait_s()
        _main_wait.group = dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=_main_wait.seconds)
        )
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


def rank_node(rank: int) -> str:
    """The node ``rank`` runs on (known once the process group is formed), else ``?``."""
    return _rank_nodes[rank] if rank < len(_rank_nodes) else "?"


def wait_for_main(what: str) -> None:
    """Wait here, on every rank, until rank 0 has done ``what`` (work only rank 0 does).

    The wait is bounded by ``DINO_LOCAT_MAIN_WAIT_S``, not by the collective timeout, so a
    slow checkpoint or figure cannot make the other ranks give up; a rank that dies or
    stops answering still ends it on every rank, with one line naming rank and node.
    """
    if not is_distributed():
        return
    try:
        if _main_wait.group is None:  # a process group formed elsewhere: its timeout applies
            dist.barrier()
        else:
            dist.barrier(group=_main_wait.group)
    except RuntimeError as err:
        lost = describe_peer_failure(err, rank(), world_size())
        raise DistributedError(
            f"{lost} (while waiting up to {_main_wait.seconds:g} s, DINO_LOCAT_MAIN_WAIT_S, "
            f"for rank 0 on node {rank_node(0)} to finish {what})"
        ) from err


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


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def shard_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous share of ``total`` items; shards differ in size
    by at most one, and concatenated in rank order they are the items in order."""
    return total * rank // world_size, total * (rank + 1) // world_size


def collective(what: str, call: Callable[[], T]) -> T:
    """Run a collective; a failure names this rank and what it was doing."""
    try:
        return call()
    except RuntimeError as err:
        raise DistributedError(
            f"rank {rank()} of {world_size()} on node {node_name()}: {what} failed; another "
            "rank probably died or did not answer within the timeout "
            f"({str(err).splitlines()[0] if str(err) else err})"
        ) from err


def _comm_device() -> torch.device:
    """Where tensors must live for the process group's backend (nccl: this GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(tensor: Tensor, to_all: bool = False) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 in rank order (row counts may differ).

    ``to_all=False``: the result lands on rank 0 only and the other ranks get an empty
    (0-row) tensor of the same trailing shape, so a big result is held once. The result is
    on the CPU. A single process gets ``tensor`` back.
    """
    if not is_distributed():
        return tensor
    device = _comm_device()
    count = torch.tensor([tensor.shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    collective("exchanging row counts", lambda: dist.all_gather(counts, count))
    sizes = [int(c) for c in counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]), device=device)
    padded[: tensor.shape[0]] = tensor
    if to_all:
        parts = [torch.empty_like(padded) for _ in sizes]
        collective("gathering results", lambda: dist.all_gather(parts, padded))
    else:
        parts = [torch.empty_like(padded) for _ in sizes] if is_main_process() else None
        collective("gathering results on rank 0", lambda: dist.gather(padded, parts, dst=0))
        if parts is None:
            return tensor.new_empty((0, *tensor.shape[1:]), device="cpu")
    return torch.cat([part[:size].cpu() for part, size in zip(parts, sizes, strict=True)])


def rows_from_every_rank(
    *tensors: Tensor, chunk_rows: int = 1 << 16
) -> Iterator[tuple[Tensor, ...]]:
    """Every rank's rows of ``tensors`` (row counts may differ between ranks, not between the
    tensors of one rank), in rank order, ``chunk_rows`` at a time, on every rank.

    For a consumer that fills one preallocated copy of the concatenation (a memory bank):
    unlike ``gather_rows`` nothing ever holds the gathered rows twice. A single process gets
    its own tensors back as one chunk. Chunks are on the CPU.
    """
    if not is_distributed():
        yield tensors
        return
    device = _comm_device()
    count = torch.tensor([tensors[0].shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    collective("exchanging row counts", partial(dist.all_gather, counts, count))
    for source, size in enumerate(int(c) for c in counts):
        for start in range(0, size, chunk_rows):
            stop = min(start + chunk_rows, size)
            chunk = []
            for tensor in tensors:
                if rank() == source:
                    buffer = tensor[start:stop].to(device).contiguous()
                else:
                    shape = (stop - start, *tensor.shape[1:])
                    buffer = torch.empty(shape, dtype=tensor.dtype, device=device)
                collective(
                    f"receiving rows of rank {source}", partial(dist.broadcast, buffer, src=source)
                )
                chunk.append(buffer.cpu())
            yield tuple(chunk)


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (so that all ranks take the same decision)."""
    if not is_distributed():
        return value
    holder = [value]
    collective("sharing a decision of rank 0", lambda: dist.broadcast_object_list(holder, src=0))
    return holder[0]


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over all ranks, on ``tensor``'s device (counts kept on the CPU
    travel through the GPU under nccl)."""
    if not is_distributed():
        return tensor
    total = tensor.to(_comm_device(), copy=True)
    collective("summing over ranks", lambda: dist.all_reduce(total))
    return total.to(tensor.device)
