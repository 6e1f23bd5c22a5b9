"""Launching training and evaluations with submitit: SLURM, a local subprocess, or in-process.

``launch/dino.py`` and ``launch/eval.py`` are thin CLIs over :func:`launch_training` and
:func:`launch_evaluation`; both share one set of submission flags (:func:`add_submission_args`).
"""

from dino_locat.launching.executors import make_executor
from dino_locat.launching.follow import follow
from dino_locat.launching.jobs import ResumableJob
from dino_locat.launching.options import add_submission_args, resolve_cluster
from dino_locat.launching.submission import (
    EVALUATORS,
    add_chaining_args,
    launch_evaluation,
    launch_training,
)

__all__ = [
    "EVALUATORS",
    "ResumableJob",
    "add_chaining_args",
    "add_submission_args",
    "follow",
    "launch_evaluation",
    "launch_training",
    "make_executor",
    "resolve_cluster",
]
