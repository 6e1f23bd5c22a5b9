"""submitit executors built from the submission flags (options.py).

The cluster is always passed to submitit explicitly: its own auto-detection picks SLURM as
soon as ``srun`` is installed, even with no daemon running.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import submitit
import torch

from dino_locat.checkout import use_in_children
from dino_locat.launching.options import resolve_cluster

# Seconds between SLURM's warning signal (USR2) and the kill at the time limit: time to save
# and requeue. Short limits get a quarter of the limit instead.
SIGNAL_DELAY_S = 120


def gpus_per_node(args: argparse.Namespace) -> int:
    """``--ngpus``, or the GPUs visible on this machine when it was not given."""
    return torch.cuda.device_count() if args.ngpus is None else args.ngpus


def cpus_per_task(args: argparse.Namespace, workers: int) -> int:
    """``--cpus_per_task``, or one per data-loading worker plus the job's own process."""
    return workers + 1 if args.cpus_per_task is None else args.cpus_per_task


def fresh_job_folder(args: argparse.Namespace, name: str) -> Path:
    """A new folder under ``--job_dir`` (default OUTPUT_DIR/jobs) for one launch.

    Fresh per launch because SLURM restarts job ids at 1 after a clean restart, and local
    job ids are process ids: a reused folder could hand back an old job's result.
    """
    base = args.job_dir or os.path.join(getattr(args, "output_dir", None) or ".", "jobs")
    Path(base).mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.mkdtemp(prefix=f"{stamp}_{name}_", dir=base)).resolve()


def make_executor(
    args: argparse.Namespace,
    folder: str | os.PathLike,
    name: str,
    dependency: str | None = None,
    workers: int = 0,
) -> submitit.Executor:
    """An executor for ``--cluster`` with the resources of ``args``.

    ``dependency`` is a SLURM dependency such as ``afterok:123`` (ignored off SLURM, where
    callers run jobs one after another instead); a job whose dependency can no longer be met
    is cancelled rather than left pending. ``workers``: the job's data-loading workers.
    The job runs the copy of dino_locat that submitted it (PYTHONPATH, inherited).
    """
    use_in_children()
    cluster = resolve_cluster(args.cluster)
    executor = submitit.AutoExecutor(
        folder=folder,
        cluster=cluster,
        slurm_max_num_timeout=args.max_requeue,
        local_max_num_timeout=args.max_requeue,
    )
    ngpus = gpus_per_node(args)
    signal_delay_s = min(SIGNAL_DELAY_S, args.timeout * 15)
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": args.timeout,
        "nodes": args.nodes,
        "tasks_per_node": max(1, ngpus),
        "cpus_per_task": cpus_per_task(args, workers),
        "mem_gb": args.mem,
        "gpus_per_node": ngpus or None,
    }
    if cluster == "slurm":
        # --requeue: a job whose node fails is put back in the queue by SLURM (the job
        # resumes from its checkpoint), whatever the cluster's JobRequeue default is.
        extra: dict[str, Any] = {"requeue": True}
        if dependency:
            extra["kill-on-invalid-dep"] = "yes"
        params.update(
            slurm_partition=args.partition,
            slurm_account=args.slurm_account,
            slurm_qos=args.slurm_qos,
            slurm_constraint=args.slurm_constraint,
            slurm_comment=args.slurm_comment,
            slurm_signal_delay_s=signal_delay_s,
            slurm_dependency=dependency,
            slurm_additional_parameters=extra,
        )
    executor.update_parameters(**params)
    return executor
