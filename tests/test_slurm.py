"""The launchers against a real SLURM cluster (start one with .ci/slurm/start.sh).

Real sbatch jobs running the real DINO training and k-NN evaluation: a training job leaves
its checkpoint, a k-NN job chained with afterok runs after it, a job preempted by a job in a
higher-priority partition is requeued and ends with the weights of an uninterrupted run, and
an exception inside a job reaches the user with its traceback. Skipped, with the reason,
only when no slurmctld answers ``scontrol ping``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
from conftest import tiny_training_argv

from dino_locat.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6
KNN_FLAGS = "--train_subset 300 --test_subset 100 --nb_knn 5 10 --num_workers 0"
JOB_LIMIT_S = 300

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="session")
def slurm() -> None:
    """Skip (saying why) unless a slurmctld answers; CI starts one before pytest."""
    if shutil.which("scontrol") is None:
        pytest.skip("no SLURM cluster: scontrol is not installed (see .ci/slurm/start.sh)")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if ping.returncode != 0 or "is UP" not in ping.stdout:
        said = (ping.stdout or ping.stderr).strip().splitlines()
        pytest.skip(f"no SLURM cluster answers `scontrol ping` ({said[0] if said else 'silent'})")


def tiny_argv(out: Path, **flags: object) -> list[str]:
    """The same seconds-per-epoch DINO run everywhere in this file (so weights compare)."""
    # ~1 s an epoch: a preemption asked for after epoch 1 lands seconds before the end
    settings = {"epochs": EPOCHS, "subset": 160, "batch_size_per_gpu": 16, **flags}
    return [str(arg) for arg in tiny_training_argv(out, **settings)]


def launch(*argv: object, timeout: float = JOB_LIMIT_S) -> subprocess.CompletedProcess:
    """``python launch/dino.py ARGV``; jobs it submitted are cancelled if it fails."""
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "launch" / "dino.py"), *map(str, argv)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired as err:
        for job_id, _ in submitted(err.stdout or "").values():
            cancel_if_queued(job_id)
        raise
    if proc.returncode != 0:
        for job_id, _ in submitted(proc.stdout).values():
            cancel_if_queued(job_id)
    return proc


def submitted(stdout: str | bytes) -> dict[str, tuple[str, Path]]:
    """{job name: (job id, its submitit folder)} from the launcher's output."""
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    found = re.findall(r"\[launch\] submitted (\w+) as job (\d+): log (\S+),", stdout)
    return {name: (job_id, Path(log).parent) for name, job_id, log in found}


def cancel_if_queued(job_id: str) -> None:
    """Leave no job of a failed test behind to block the next ones."""
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def sacct_times(job_id: str) -> tuple[str, str, str]:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,Start,End"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.splitlines()
    return tuple(out[-1].split("|"))


def wait_done(job: submitit.Job, limit_s: float = JOB_LIMIT_S) -> None:
    deadline = time.monotonic() + limit_s
    while not job.done(force_check=True):
        if time.monotonic() > deadline:
            cancel_if_queued(job.job_id)
            pytest.fail(
                f"job {job.job_id} did not finish within {limit_s}s; see {job.paths.stdout}"
            )
        time.sleep(2)


@pytest.fixture(scope="module")
def chained_run(slurm, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Uninterrupted training, then k-NN with afterok, submitted together (--wait)."""
    out = tmp_path_factory.mktemp("slurm_chain") / "dino"
    eval_flags = ["--eval", "knn", "--eval_args", f"knn={KNN_FLAGS}"]
    proc = launch(*tiny_argv(out), "--cluster", "slurm", "--wait", *eval_flags)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_training_job_finishes_and_leaves_its_checkpoint(chained_run):
    out, proc = chained_run
    jobs = submitted(proc.stdout)
    assert set(jobs) == {"dino", "eval_knn"}
    job_id, folder = jobs["dino"]
    assert folder.parent == out / "jobs"
    log = (folder / f"{job_id}_0_log.out").read_text()
    assert f"Epoch [{EPOCHS}/{EPOCHS}]" in log
    assert f"Epoch [{EPOCHS}/{EPOCHS}]" in proc.stdout, "--wait streams the job's log"
    assert re.search(rf"\[launch\] job {job_id}: (PENDING|RUNNING) \(", proc.stdout)
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == EPOCHS and {"student", "teacher", "optimizer"} <= set(ckpt)
    assert sacct_times(job_id)[0] == "COMPLETED"


def test_knn_job_starts_after_the_training_and_writes_its_result(chained_run):
    out, proc = chained_run
    jobs = submitted(proc.stdout)
    train_id, _ = jobs["dino"]
    knn_id, folder = jobs["eval_knn"]
    script = (folder / f"{knn_id}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{train_id}" in script
    results = json.loads((out / "eval_knn" / "results.json").read_text())
    assert results["evaluation"] == "knn" and results["epoch"] == EPOCHS
    assert set(results["knn"]) == {"5", "10"}
    _, _, train_end = sacct_times(train_id)
    _, knn_start, _ = sacct_times(knn_id)
    assert knn_start >= train_end, (knn_start, train_end)


def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(chained_run, tmp_path):
    reference, _ = chained_run
    out = tmp_path / "dino"
    # Two CPUs = the whole node, so the high-priority job below must preempt this one.
    proc = launch(*tiny_argv(out), "--cluster", "slurm", "--cpus_per_task", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id, folder = submitted(proc.stdout)["dino"]
    job = submitit.SlurmJob(folder, job_id)
    deadline = time.monotonic() + JOB_LIMIT_S
    while not (out / "checkpoint.pth").exists():  # first epoch done: preempt mid-run
        assert not job.done(force_check=True), "the training finished or died before preemption"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    high = subprocess.run(
        ["sbatch", "--parsable", "-p", "high", "-c", "2", "-o", str(tmp_path / "high_%j.out")]
        + ["--wrap", "sleep 1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    try:
        wait_done(job)
        job.result()
    finally:
        cancel_if_queued(high)
    log = job.stdout()
    assert log.count("Starting with JobEnvironment") == 2, "the job was not requeued exactly once"
    assert "this job is preempted" in job.stderr()
    assert f"requeueing: the next run resumes from {out / 'checkpoint.pth'}" in log
    assert f"Epoch [{EPOCHS}/{EPOCHS}]" in log
    resumed, uninterrupted = (load_checkpoint(p / "checkpoint.pth") for p in (out, reference))
    assert resumed["epoch"] == uninterrupted["epoch"] == EPOCHS
    for key in ("student", "teacher"):
        for name, tensor in uninterrupted[key].items():
            assert torch.equal(resumed[key][name], tensor), f"{key}.{name} differs"
    assert torch.equal(resumed["dino_loss"]["center"], uninterrupted["dino_loss"]["center"])


def test_exception_inside_a_job_reaches_the_user_with_its_traceback(slurm, tmp_path):
    data = tmp_path / "broken" / "only_class"
    data.mkdir(parents=True)
    for i in range(8):
        (data / f"bad{i}.png").write_bytes(b"not a png at all")
    out = tmp_path / "dino"
    argv = tiny_argv(out, data_path=data.parent, batch_size_per_gpu=4, epochs=1)
    proc = launch(*argv, "--cluster", "slurm", "--wait", "--eval", "knn")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert "cannot read image file" in proc.stderr and str(data) in proc.stderr
    jobs = submitted(proc.stdout)
    job_id, folder = jobs["dino"]
    with pytest.raises(submitit.core.utils.FailedJobError, match="cannot read image file"):
        submitit.SlurmJob(folder, job_id).result()
    # the k-NN job chained on it never runs: cancelled, not left pending forever
    knn_id, _ = jobs["eval_knn"]
    script = (folder / f"{knn_id}_submission.sh").read_text()
    assert "#SBATCH --kill-on-invalid-dep=yes" in script
    assert sacct_times(knn_id)[0].startswith("CANCELLED")
    assert not (out / "eval_knn").exists()
