"""Submitting DINO training and the evaluators, and chaining evaluations after training.

What the launchers in ``launch/`` call. Training and each evaluation run as one submitit
job (:class:`ResumableJob`). On SLURM the evaluations of ``--eval`` are submitted together
with the training and wait for it with an ``afterok`` dependency; on the local executor they
run one after another once the training has succeeded.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import submitit

from dino_locat.checkpoint import RESUME_HINT, checkpoint_file, load_checkpoint
from dino_locat.errors import run_command
from dino_locat.evaluation import hummingbird, knn, linear, segmentation
from dino_locat.evaluation.options import default_output_dir
from dino_locat.launching.executors import fresh_job_folder, gpus_per_node, make_executor
from dino_locat.launching.follow import describe, follow
from dino_locat.launching.jobs import ResumableJob
from dino_locat.launching.options import (
    add_submission_args,
    check_submission_args,
    resolve_cluster,
)
from dino_locat.training import get_args_parser as training_args_parser
from dino_locat.training import main as train_main
from dino_locat.training.args import resolve_args

# name -> (parser builder taking add_help, function running the evaluation)
EVALUATORS: dict[str, tuple[Callable[..., argparse.ArgumentParser], Callable[..., Any]]] = {
    "knn": (knn.get_args_parser, knn.run_knn),
    "linear": (linear.get_args_parser, linear.run_linear),
    "segmentation": (segmentation.get_args_parser, segmentation.run_segmentation),
    "hummingbird": (hummingbird.get_args_parser, hummingbird.run_hummingbird),
}


def eval_list(text: str) -> list[str]:
    """``--eval knn,linear`` -> ["knn", "linear"] (argparse type; unknown names rejected)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in EVALUATORS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown evaluator(s) {', '.join(unknown)}; choose from {', '.join(EVALUATORS)}"
        )
    return list(dict.fromkeys(names))


def add_eval_flags(group: argparse._ActionsContainer, default: list[str]) -> None:
    """``--eval`` / ``--eval_args`` with their parsing: one definition for every launcher."""
    group.add_argument(
        "--eval",
        type=eval_list,
        default=default,
        metavar="NAMES",
        help=f"comma-separated evaluators: {','.join(EVALUATORS)} "
        f"(default: {','.join(default) or 'none'})",
    )
    group.add_argument(
        "--eval_args",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="flags for one evaluator, e.g. --eval_args 'knn=--nb_knn 10 20 --train_subset "
        "2000' (repeatable; see `python eval/knn.py --help`)",
    )


def add_chaining_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--eval`` / ``--eval_args``: evaluations to run on the checkpoint a training leaves."""
    group = parser.add_argument_group(
        "evaluation after training",
        "evaluators run on OUTPUT_DIR/checkpoint.pth once the training succeeded, each as its "
        "own job (SLURM: submitted now, starting after the training with afterok; local: one "
        "after another). Results go to OUTPUT_DIR/eval_<name>/results.json.",
    )
    add_eval_flags(group, default=[])
    return group


def _group_dests(add_group: Callable[[argparse.ArgumentParser], Any]) -> set[str]:
    """The argparse destinations that ``add_group`` defines."""
    parser = argparse.ArgumentParser(add_help=False)
    add_group(parser)
    return {action.dest for action in parser._actions}


def without(args: argparse.Namespace, *groups: Callable[..., Any]) -> argparse.Namespace:
    """A copy of ``args`` without the flags of ``groups``: what the job itself receives."""
    dropped = set().union(*(_group_dests(group) for group in groups))
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in dropped})


def evaluation_args(name: str, checkpoint: str | Path, flags: list[str]) -> argparse.Namespace:
    """Parse one evaluator's flags (``flags``) for ``checkpoint``, as its own CLI would."""
    parser = EVALUATORS[name][0]()
    parser.prog = f"--eval_args {name}="
    args = parser.parse_args(["--pretrained_weights", str(checkpoint), *flags])
    args.output_dir = str(default_output_dir(args, name).resolve())
    return args


def _eval_flags(args: argparse.Namespace) -> dict[str, list[str]]:
    flags: dict[str, list[str]] = {}
    for item in args.eval_args:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in EVALUATORS:
            raise ValueError(
                f"--eval_args {item!r}: expected NAME=FLAGS with NAME in {', '.join(EVALUATORS)}"
            )
        if name not in args.eval:
            raise ValueError(f"--eval_args {item!r}: {name} is not in --eval {','.join(args.eval)}")
        flags.setdefault(name, []).extend(shlex.split(text))
    return flags


def eval_resources(args: argparse.Namespace) -> argparse.Namespace:
    """Evaluators are single-process: one node and at most one GPU, whatever training used."""
    return argparse.Namespace(**{**vars(args), "nodes": 1, "ngpus": min(1, gpus_per_node(args))})


def submit_job(
    args: argparse.Namespace,
    folder: Path,
    name: str,
    job: ResumableJob,
    workers: int,
    dependency: str | None = None,
) -> submitit.Job[Any]:
    """Submit ``job`` as ``name`` with the resources of ``args`` (``dependency``: a SLURM
    dependency such as ``afterok:123``) and say so; the study submits its pieces this way too."""
    submitted = make_executor(args, folder, name, dependency, workers).submit(job)
    after = f" (starts after job {dependency.split(':', 1)[1]} succeeds)" if dependency else ""
    print(f"[launch] submitted {name} as {describe(submitted)}{after}", flush=True)
    return submitted


def launch_training(args: argparse.Namespace) -> int:
    """Submit DINO training (+ ``--eval`` chain) as ``args`` say; return an exit status.

    Local and debug runs wait, streaming the log; SLURM runs return after printing the job
    ids unless ``--wait``. Bad flags raise ValueError before anything is submitted.
    """
    check_submission_args(args)
    train_args = without(args, add_submission_args, add_chaining_args)
    resolved, _ = resolve_args(train_args)  # validates every flag before submitting
    train_args.output_dir = str(Path(resolved.output_dir).resolve())
    if train_args.data_path:
        train_args.data_path = str(Path(train_args.data_path).resolve())
    checkpoint = Path(train_args.output_dir) / "checkpoint.pth"
    if checkpoint.exists():  # the job would resume from it: a damaged one fails here, now
        load_checkpoint(checkpoint, hint=RESUME_HINT, mmap=True)
    flags = _eval_flags(args)
    evals = {name: evaluation_args(name, checkpoint, flags.get(name, [])) for name in args.eval}

    cluster = resolve_cluster(args.cluster)
    args.output_dir = train_args.output_dir
    folder = fresh_job_folder(args, "dino")
    job = ResumableJob(train_main, train_args, resume_from=checkpoint)
    train_job = submit_job(args, folder, "dino", job, resolved.num_workers)
    eval_submission = eval_resources(args)

    def submit_eval(name: str, dependency: str | None = None) -> submitit.Job[Any]:
        eval_job = ResumableJob(EVALUATORS[name][1], evals[name])
        workers = evals[name].num_workers
        return submit_job(eval_submission, folder, f"eval_{name}", eval_job, workers, dependency)

    if cluster != "slurm":
        status = follow(train_job)
        for name in evals:
            if status:
                break
            status = follow(submit_eval(name))
        return status
    eval_jobs = [submit_eval(name, f"afterok:{train_job.job_id}") for name in evals]
    if not args.wait:
        print(f"[launch] follow with: tail -f {train_job.paths.stdout}   (squeue --me)")
        return 0
    status = follow(train_job)
    for eval_job in eval_jobs:
        if status:
            print(f"[launch] training failed: cancelling job {eval_job.job_id}", file=sys.stderr)
            eval_job.cancel(check=False)
            continue
        status = follow(eval_job)
    return status


def launch_evaluation(name: str, args: argparse.Namespace) -> int:
    """Submit one evaluator run (``launch/eval.py NAME ...``); return an exit status."""
    check_submission_args(args)
    eval_args = without(args, add_submission_args)
    del eval_args.evaluator
    for flag in ("pretrained_weights", "data_path", "load_features", "dump_features"):
        if getattr(eval_args, flag, None):
            setattr(eval_args, flag, str(Path(getattr(eval_args, flag)).resolve()))
    if eval_args.pretrained_weights:  # a damaged checkpoint fails here, not in the job
        load_checkpoint(checkpoint_file(eval_args.pretrained_weights), mmap=True)
    eval_args.output_dir = str(default_output_dir(eval_args, name).resolve())
    args.output_dir = eval_args.output_dir
    folder = fresh_job_folder(args, f"eval_{name}")
    job = ResumableJob(EVALUATORS[name][1], eval_args)
    submitted = submit_job(eval_resources(args), folder, f"eval_{name}", job, eval_args.num_workers)
    if resolve_cluster(args.cluster) == "slurm" and not args.wait:
        print(f"[launch] follow with: tail -f {submitted.paths.stdout}   (squeue --me)")
        return 0
    return follow(submitted)


def training_launch_parser() -> argparse.ArgumentParser:
    """DINO's training flags plus, in groups of their own, submission and ``--eval``."""
    parser = training_args_parser()
    parser.prog = "launch/dino.py"
    parser.description = (
        "Submit DINO pretraining with submitit: to SLURM (sbatch), as a local subprocess, or "
        "in this process. A job stopped at its time limit or preempted is requeued and "
        "resumes from OUTPUT_DIR/checkpoint.pth."
    )
    add_submission_args(parser)
    add_chaining_args(parser)
    return parser


def evaluation_launch_parser() -> argparse.ArgumentParser:
    """``launch/eval.py NAME``: the evaluator's own flags plus the submission flags."""
    parser = argparse.ArgumentParser(
        "launch/eval.py",
        description="Submit one evaluator (the same flags as eval/NAME.py) with submitit.",
    )
    subparsers = parser.add_subparsers(dest="evaluator", required=True, metavar="EVALUATOR")
    for name, (build_parser, _) in EVALUATORS.items():
        evaluator = build_parser(add_help=False)
        sub = subparsers.add_parser(
            name, parents=[evaluator], help=evaluator.prog, description=evaluator.prog
        )
        add_submission_args(sub)
    return parser


def exit_with(launch: Callable[..., int], *args: Any) -> NoReturn:
    """Run a launcher and exit with its status; a bad flag or input exits 2 with one line."""
    raise SystemExit(run_command(launch, *args))
