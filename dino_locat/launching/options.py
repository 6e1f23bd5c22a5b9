"""The submission flags shared by every launcher: one definition, no copies.

Design: docs/architecture.md#launching-and-distributed-set-up.

``add_submission_args`` adds them as their own argparse group to any job's parser, so
``launch/dino.py --help`` and ``launch/eval.py knn --help`` list the job's flags and, apart,
where and how the job runs.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import subprocess

CLUSTERS = ("auto", "slurm", "local", "debug")


def add_submission_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the submitit/SLURM flags to ``parser`` in a group of their own."""
    group = parser.add_argument_group(
        "submission",
        "where and how the job runs (submitit). auto = SLURM when `srun` is on PATH and a "
        "SLURM controller answers, else a local subprocess whose log streams to this console.",
    )
    group.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default="auto",
        help="slurm: sbatch; local: a subprocess on this machine; debug: in this process "
        "(pdb-friendly). Default: %(default)s",
    )
    group.add_argument("--nodes", type=int, default=1, help="number of nodes (default: 1)")
    group.add_argument(
        "--ngpus",
        type=int,
        default=None,
        help="GPUs per node; one process per GPU, one CPU process when 0 "
        "(default: the GPUs visible on this machine)",
    )
    group.add_argument(
        "--cpus_per_task",
        type=int,
        default=None,
        help="CPUs per process (default: --num_workers + 1 when the job has that flag, else 1)",
    )
    group.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    group.add_argument(
        "--timeout",
        type=int,
        default=2800,
        help="time limit in minutes; at the limit the job saves, requeues and resumes "
        "(default: %(default)s)",
    )
    group.add_argument("--mem", type=float, default=None, help="memory per node in GB")
    group.add_argument("--slurm_account", default=None, help="SLURM account (sbatch --account)")
    group.add_argument("--slurm_qos", default=None, help="SLURM quality of service (--qos)")
    group.add_argument(
        "--slurm_constraint", default=None, help="SLURM node features (--constraint)"
    )
    group.add_argument("--slurm_comment", default=None, help="SLURM job comment (--comment)")
    group.add_argument(
        "--job_dir",
        default=None,
        help="where submitit keeps job scripts, pickles and logs; each launch gets a fresh "
        "sub-folder (default: OUTPUT_DIR/jobs)",
    )
    group.add_argument(
        "--max_requeue",
        type=int,
        default=3,
        help="how often a job that hits its time limit is requeued (preemptions do not count; "
        "default: %(default)s)",
    )
    group.add_argument(
        "--wait",
        action="store_true",
        help="SLURM: stay attached, stream the job's log and exit with its status "
        "(local and debug always wait)",
    )
    return group


@functools.lru_cache(maxsize=1)
def slurm_available() -> bool:
    """True when ``srun`` is on PATH and ``scontrol ping`` finds a controller UP.

    SLURM's client tools can be installed with no cluster behind them (a laptop, a CI
    machine between runs); sbatch would then fail, so ``auto`` must not pick SLURM.
    Asked once per process.
    """
    if shutil.which("srun") is None:
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        ping = None
    if ping is not None and ping.returncode == 0 and "UP" in ping.stdout:
        return True
    print(
        "[launch] srun is on PATH but no SLURM controller answers `scontrol ping`: "
        "running locally (--cluster slurm to insist)"
    )
    return False


def resolve_cluster(name: str) -> str:
    """``auto`` -> ``slurm`` when a SLURM cluster answers, else ``local``; others unchanged.

    Decided here rather than by submitit's AutoExecutor so the choice is ours and visible.
    """
    if name not in CLUSTERS:
        raise ValueError(f"--cluster {name!r}: expected one of {', '.join(CLUSTERS)}")
    if name == "auto":
        return "slurm" if slurm_available() else "local"
    return name


def check_submission_args(args: argparse.Namespace) -> None:
    """Reject impossible combinations before anything is submitted (messages name the flag)."""
    cluster = resolve_cluster(args.cluster)
    for flag in ("nodes", "timeout"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("ngpus", "cpus_per_task"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "ngpus" else 1):
            raise ValueError(f"--{flag} must be >= {0 if flag == 'ngpus' else 1}, got {value}")
    if args.max_requeue < 0:
        raise ValueError(f"--max_requeue must be >= 0, got {args.max_requeue}")
    if cluster != "slurm" and args.nodes != 1:
        raise ValueError(f"--nodes {args.nodes} needs --cluster slurm ({cluster} runs on one node)")
