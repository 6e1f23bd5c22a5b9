"""Staying attached to a submitted job: stream its log here and report how it ended."""

from __future__ import annotations

import codecs
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import submitit

POLL_S = 1.0
QUEUE_POLL_S = 10.0


class LogTail:
    """Copies what a job appends to one log file onto a console stream."""

    def __init__(self, path: str | os.PathLike, stream: TextIO) -> None:
        self.path = Path(path)
        self.stream = stream
        self.offset = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def pump(self) -> None:
        """Write out whatever is new since the last call."""
        try:
            with self.path.open("rb") as handle:
                if os.fstat(handle.fileno()).st_size < self.offset:  # rewritten from scratch
                    self.offset = 0
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        if data:
            self.offset += len(data)
            self.stream.write(self.decoder.decode(data))
            self.stream.flush()


class QueueState:
    """Reports a SLURM job's queue state and reason (``squeue``) whenever they change.

    Without it a job that can never start (e.g. PENDING for PartitionConfig: more CPUs than
    any node has) would look like a silent hang.
    """

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.last = ""
        self.checked = float("-inf")

    def pump(self) -> None:
        if time.monotonic() - self.checked < QUEUE_POLL_S:
            return
        self.checked = time.monotonic()
        try:
            state = subprocess.run(
                ["squeue", "-h", "-j", self.job_id, "-o", "%T (%r)"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return
        if state and state != self.last:
            print(f"[launch] job {self.job_id}: {state}", flush=True)
            self.last = state


# squeue states of a job that will still run (or is running): e.g. requeued after NODE_FAIL,
# while sacct, which submitit reads, already reports how the last run ended.
QUEUED_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
}


def finished(job: submitit.Job[Any], force_check: bool = False) -> bool:
    """submitit's ``done()``, except that a SLURM job SLURM has put back in the queue (a
    node failed under it and it was requeued) is not finished yet."""
    if not job.done(force_check=force_check):
        return False
    if not isinstance(job, submitit.SlurmJob):
        return True
    try:
        state = subprocess.run(
            ["squeue", "-h", "-j", job.job_id, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return True
    return state not in QUEUED_STATES


def describe(job: submitit.Job[Any]) -> str:
    """One line saying which job this is and where its log files are."""
    paths = job.paths
    return f"job {job.job_id}: log {paths.stdout}, errors {paths.stderr}"


def _last_error_line(message: str) -> str:
    """The exception line that ends the traceback inside submitit's error message."""
    lines = [line for line in message.splitlines() if line.strip()]
    rules = [i for i, line in enumerate(lines) if set(line.strip()) == {"-"}]
    if len(rules) >= 2:
        return lines[rules[1] - 1]
    return lines[0] if lines else "unknown error"


def follow(job: submitit.Job[Any]) -> int:
    """Wait for ``job``, streaming its first task's stdout/stderr; return 0 if it succeeded.

    On failure the job's own traceback has been streamed (it is also in its error log) and
    its last line is repeated. Ctrl-C cancels a local job and detaches from a SLURM one,
    which keeps running.
    """
    if isinstance(job, submitit.local.debug.DebugJob):
        job.results()  # runs in this process; an exception propagates with its traceback
        return 0
    watchers: list[LogTail | QueueState] = [
        LogTail(job.paths.stdout, sys.stdout),
        LogTail(job.paths.stderr, sys.stderr),
    ]
    if isinstance(job, submitit.SlurmJob):
        watchers.append(QueueState(job.job_id))
    try:
        while not finished(job):
            for watcher in watchers:
                watcher.pump()
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        if isinstance(job, submitit.SlurmJob):
            print(
                f"\n[launch] detached; job {job.job_id} keeps running (scancel {job.job_id} "
                "stops it)",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"\n[launch] interrupted: cancelling job {job.job_id}", file=sys.stderr)
            job.cancel(check=False)
        return 130
    for watcher in watchers:
        watcher.pump()
    task, error = first_error(job)
    if error is None:
        print(f"[launch] job {job.job_id} finished", flush=True)
        return 0
    which = f" (rank {task})" if job.num_tasks > 1 else ""
    print(
        f"[launch] job {job.job_id} failed{which}: {_last_error_line(str(error))}", file=sys.stderr
    )
    print(f"[launch] {describe(job.task(task) if which else job)}", file=sys.stderr, flush=True)
    return 1


def first_error(job: submitit.Job[Any]) -> tuple[int, Exception | None]:
    """(rank, error) of the task whose failure explains the job's, or (0, None) if none failed.

    A rank that raised comes before one that merely stopped without a result (which is what
    the other ranks do when one of them dies), so the user sees the cause, not its echo.
    """
    errors = [(task, job.task(task).exception()) for task in range(job.num_tasks)]
    failed = [(task, error) for task, error in errors if error is not None]
    raised = [item for item in failed if isinstance(item[1], submitit.core.utils.FailedJobError)]
    return (raised or failed or [(0, None)])[0]
