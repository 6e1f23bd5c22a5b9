"""The callable that submitit runs, and how it survives time limits and preemption."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit
import torch

from dino_locat.distributed import describe_peer_failure, is_peer_failure, node_name


def export_distributed_env() -> None:
    """Set torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) for this task.

    submitit knows the task layout from SLURM (SLURM_PROCID, SLURM_JOB_NODELIST...) or from
    its local executor; exporting it the torchrun way lets ``dino_locat.distributed`` read
    one set of variables however the job was started. The master is the first node of the
    allocation and the port is derived from the job id, so all tasks agree, also after a
    requeue. CUDA_VISIBLE_DEVICES is left alone: each process picks cuda:LOCAL_RANK.
    """
    submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )


def use_allocated_cpus() -> None:
    """One intra-op thread per CPU that SLURM gave this task (``SLURM_CPUS_PER_TASK``),
    unless ``OMP_NUM_THREADS`` is set: without CPU binding, torch would start a thread per
    core of the whole host in every task, and the ranks of a node would fight over cores."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(int(cpus))


class ResumableJob:
    """Runs ``entry(args)`` in every task of a submitit job.

    When SLURM warns of the time limit or of a preemption (USR2), submitit calls
    ``checkpoint()`` on global rank 0. It returns this same job, so submitit requeues it;
    the requeued run calls ``entry`` again, which continues from ``resume_from`` when
    ``entry`` auto-resumes (DINO training does, from ``output_dir/checkpoint.pth``, written
    atomically, so a kill mid-save leaves the previous one intact); other jobs start over.

    Every rank says in its own log (``JOBID_RANK_log.out``) where it runs, and an error is
    tagged with the rank and node that raised it. When a node dies, SLURM requeues the job
    (sbatch ``--requeue``, which the launcher sets); the ranks that survived it only see a
    failed collective, so under SLURM they exit without writing a result: a result file
    would make the job look finished while SLURM restarts it.
    """

    def __init__(
        self,
        entry: Callable[[argparse.Namespace], Any],
        args: argparse.Namespace,
        resume_from: str | os.PathLike | None = None,
    ) -> None:
        self.entry = entry
        self.args = args
        self.resume_from = None if resume_from is None else Path(resume_from)

    def __call__(self) -> Any:
        env = submitit.JobEnvironment()
        export_distributed_env()
        use_allocated_cpus()
        where = f"rank {env.global_rank} of {env.num_tasks} on node {node_name()}"
        print(
            f"[launch] job {env.job_id}: {where} (local rank {env.local_rank}, "
            f"{env.num_nodes} node(s), {torch.get_num_threads()} thread(s)), master "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            flush=True,
        )
        try:
            return self.entry(self.args)
        except Exception as err:
            if env.num_tasks > 1 and is_peer_failure(err):
                message = describe_peer_failure(err, env.global_rank, env.num_tasks)
                print(f"[launch] {message}", file=sys.stderr, flush=True)
                if env.cluster == "slurm":
                    print(
                        f"[launch] {where}: exiting without a result; if a node failed, SLURM "
                        "requeues the job and the next run resumes from its last checkpoint",
                        file=sys.stderr,
                        flush=True,
                    )
                    raise SystemExit(1) from err
            err.add_note(f"[launch] raised by {where} of job {env.job_id}")
            raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2: requeue this same job (see the class docstring)."""
        if self.resume_from is not None and self.resume_from.is_file():
            print(f"[launch] requeueing: the next run resumes from {self.resume_from}", flush=True)
        else:
            print("[launch] requeueing: the next run starts over", flush=True)
        return submitit.helpers.DelayedSubmission(self)
