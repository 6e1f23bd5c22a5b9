"""Running the study's plan: submitting each unfinished piece as a submitit job (on SLURM
all at once, evaluations waiting for their training with afterok; locally one after another),
reattaching to the SLURM jobs of an earlier detached start, and following them to the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from typing import Any

import submitit

from dino_locat.checkout import code_version
from dino_locat.evaluation.report import write_json_atomic
from dino_locat.launching.executors import fresh_job_folder
from dino_locat.launching.follow import QUEUED_STATES, follow
from dino_locat.launching.jobs import ResumableJob
from dino_locat.launching.options import check_submission_args, resolve_cluster
from dino_locat.launching.study.combine import combine_studies
from dino_locat.launching.study.plan import Piece, minutes, plan_study, print_plan, study_relative
from dino_locat.launching.study.report import report
from dino_locat.launching.submission import eval_resources, submit_job


def _job_args(args: argparse.Namespace, piece: Piece) -> argparse.Namespace:
    """Submission flags for a piece: its own job folder; evaluations on one process."""
    job_args = argparse.Namespace(**{**vars(args), "output_dir": str(piece.folder)})
    return eval_resources(job_args) if piece.kind == "eval" else job_args


def _reattach(piece: Piece) -> submitit.Job[Any] | None:
    """The SLURM job a detached earlier study submitted for this piece, if still queued."""
    if not piece.record_path.is_file():
        return None
    record = json.loads(piece.record_path.read_text())
    if record.get("cluster") != "slurm" or not piece.planned_as(record):
        return None
    state = subprocess.run(
        ["squeue", "-h", "-j", str(record["job_id"]), "-o", "%T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.strip()
    if state not in QUEUED_STATES:
        return None
    print(f"[study] {piece.label}: attaching to job {record['job_id']} ({state})", flush=True)
    folder = piece.root / record["job_folder"]  # older records: absolute
    return submitit.SlurmJob(folder=folder, job_id=str(record["job_id"]))


def submit_piece(args: argparse.Namespace, piece: Piece, cluster: str) -> submitit.Job[Any]:
    """Submit one piece (on SLURM after its training, with afterok) and record it."""
    job = _reattach(piece) if cluster == "slurm" else None
    if job is not None:
        return job
    job_args = _job_args(args, piece)
    folder = fresh_job_folder(job_args, piece.kind if piece.kind != "eval" else piece.evaluator)
    parent_job = piece.parent.job if piece.parent else None
    dependency = f"afterok:{parent_job.job_id}" if cluster == "slurm" and parent_job else None
    resume = piece.checkpoint if piece.kind == "train" else None
    name = f"study_{piece.label.replace(' ', '_')}"
    job = submit_job(
        job_args,
        folder,
        name,
        # a copy: a job run in this process (debug) must not change the flags it is judged by
        ResumableJob(piece.entry, copy.deepcopy(piece.args), resume),
        piece.workers,
        dependency,
    )
    record = {
        "label": piece.label,
        "flags": piece.recorded_flags(),
        "code_version": code_version(),
        "cluster": cluster,
        "job_id": job.job_id,
        "job_folder": study_relative(str(folder), piece.root),
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(piece.record_path, record)
    return job


def run_pieces(args: argparse.Namespace, pieces: list[Piece], cluster: str) -> list[str] | None:
    """Run what is not finished; return the labels of pieces that failed or could not run
    (None: submitted to SLURM without ``--wait``, nothing to report yet).

    Local/debug: one job after another, an evaluation only after its training succeeded.
    SLURM: everything submitted at once (evaluations wait with afterok), then followed.
    """
    done: dict[int, bool] = {}
    for piece in pieces:  # an evaluation of a network that runs again runs again too
        parent_done = piece.parent is None or done[id(piece.parent)]
        done[id(piece)] = parent_done and piece.done()
    print_plan(pieces, done)
    failed: list[str] = []
    spent = estimated = 0.0
    remaining = sum(p.estimate_s or 0.0 for p in pieces if not done[id(p)])
    for piece in pieces:
        if done[id(piece)]:
            print(f"[study] skipped {piece.label}: finished in {piece.folder}", flush=True)
            continue
        if piece.parent is not None and piece.parent.label in failed:
            failed.append(piece.label)
            print(f"[study] not run: {piece.label} (its network did not finish)", flush=True)
            continue
        print(f"[study] === {piece.label} ({piece.folder})", flush=True)
        start = time.perf_counter()
        piece.job = submit_piece(args, piece, cluster)
        if cluster == "slurm":
            continue
        status = follow(piece.job)
        if status == 130:
            raise KeyboardInterrupt
        took = time.perf_counter() - start
        if status:
            failed.append(piece.label)
            continue
        spent += took
        estimated += piece.estimate_s or 0.0
        remaining -= piece.estimate_s or 0.0
        eta = remaining * spent / estimated if estimated else None
        print(
            f"[study] {piece.label} finished in {took:.0f} s (estimate "
            f"{minutes(piece.estimate_s)}); remaining about {minutes(eta)}",
            flush=True,
        )
    if cluster == "slurm":
        if not args.wait:
            print(
                "[study] jobs submitted; rerun the same command (or add --wait) to follow "
                "them and write the results: finished pieces are skipped, queued ones "
                "reattached",
                flush=True,
            )
            return None
        for piece in pieces:
            if piece.job is not None:
                status = follow(piece.job)
                if status == 130:
                    raise KeyboardInterrupt
                if status:
                    failed.append(piece.label)
    return failed


def run_study(args: argparse.Namespace) -> int:
    """The whole study as ``launch/study.py`` flags say; returns an exit status."""
    if args.combine:
        combine_studies(args.combine, args.output_dir)
        return 0
    if args.report_only:
        pieces = plan_study(args)
        report(args, pieces, [p.label for p in pieces if not p.done()])
        return 0
    check_submission_args(args)
    cluster = resolve_cluster(args.cluster)
    pieces = plan_study(args)
    start = time.perf_counter()
    try:
        failed = run_pieces(args, pieces, cluster)
    except KeyboardInterrupt:
        print(
            "[study] interrupted: rerun the same command to continue (finished pieces are "
            "skipped, an interrupted training resumes from its checkpoint)",
            file=sys.stderr,
            flush=True,
        )
        return 130
    if failed is None:
        return 0
    report(args, pieces, failed)
    print(f"[study] wall time {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return 1 if failed else 0
