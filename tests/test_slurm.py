"""The launchers against a real SLURM cluster (start one with .ci/slurm/start.sh).

Real sbatch jobs running the real DINO training and k-NN evaluation: a training job leaves
its checkpoint, a k-NN job chained with afterok runs after it, a job preempted by a job in a
higher-priority partition is requeued and ends with the weights of an uninterrupted run, and
an exception inside a job reaches the user with its traceback. On the two nodes of the test
cluster (n1, n2: two slurmd daemons on this host): two nodes x one process train exactly as
one node x two processes, with an online k-NN curve equal to one process's; a node that
crashes mid-run (its slurmd, slurmstepd and task killed) gets the job requeued by SLURM, and
the rerun resumes to the same weights; a job with a one-minute limit finishes a longer run
through time-limit requeues. Skipped, with the reason, only when no slurmctld answers
``scontrol ping`` (or, for the two-node tests, when the cluster is not the two-node one that
.ci/slurm/start.sh starts).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import submitit
import torch
from conftest import tiny_training_argv

from dino_locat.checkpoint import load_checkpoint
from dino_locat.launching.follow import finished

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6
KNN_FLAGS = "--train_subset 300 --test_subset 100 --nb_knn 5 10 --num_workers 0"
JOB_LIMIT_S = 600  # generous: a loaded 2-core machine runs these jobs several times slower
NODES = ("n1", "n2")
RUN_DIR = Path(os.environ.get("DINO_SLURM_RUN_DIR", "/run/dino_locat-slurm"))
# Two ranks x 8 images = 2 steps an epoch on 32 images: a few seconds per run on 2 cores.
# The online k-NN on (both ranks probe, sharded); drop path 0, so that one process with
# twice the batch trains the same model (drop path draws its randomness per rank).
TWO_NODE_FLAGS = {
    "epochs": 4, "subset": 32, "batch_size_per_gpu": 8, "drop_path_rate": 0,
    "knn_freq": 2, "knn_train_images": 40, "knn_test_images": 21,
}  # fmt: skip
TIME_LIMITED_S = 75  # training time of the run that meets a one-minute limit

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
    """Until the job is over, as the launcher's --wait sees it (requeued = not over)."""
    deadline = time.monotonic() + limit_s
    while not finished(job, force_check=True):
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
    # The high-priority job below wants every CPU of both nodes, so it must preempt this one.
    proc = launch(*tiny_argv(out), "--cluster", "slurm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id, folder = submitted(proc.stdout)["dino"]
    job = submitit.SlurmJob(folder, job_id)
    deadline = time.monotonic() + JOB_LIMIT_S
    while not (out / "checkpoint.pth").exists():  # first epoch done: preempt mid-run
        assert not job.done(force_check=True), "the training finished or died before preemption"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    high = subprocess.run(
        ["sbatch", "--parsable", "-p", "high", "-N", str(len(NODES)), "-c", "2"]
        + ["-o", str(tmp_path / "high_%j.out")]
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
    eval_flags = ["--eval", "knn", "--eval_args", "knn=--num_workers 0"]  # fits a 2-CPU node
    proc = launch(*argv, "--cluster", "slurm", "--wait", *eval_flags)
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


# -- two nodes ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def two_nodes(slurm) -> None:
    """Skip (saying why) unless the cluster is the two-node one of .ci/slurm/start.sh."""
    nodes = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30
    ).stdout.split()
    if sorted(set(nodes)) != list(NODES):
        pytest.skip(f"needs the two-node test cluster of .ci/slurm/start.sh; nodes: {nodes}")
    missing = [n for n in NODES if not (RUN_DIR / f"slurmd-{n}.pid").is_file()]
    if missing:
        pytest.skip(f"no slurmd pid file under {RUN_DIR} for {missing}: not the test cluster")


def two_node_argv(out: Path, **flags: object) -> list[str]:
    return [str(arg) for arg in tiny_training_argv(out, **{**TWO_NODE_FLAGS, **flags})]


def rank_lines(job_id: str, folder: Path, ranks: int) -> list[str]:
    """The line each rank writes at start-up into its own log (the first run's)."""
    lines = []
    for rank in range(ranks):
        log = (folder / f"{job_id}_{rank}_log.out").read_text()
        lines.append(re.search(rf"\[launch\] job {job_id}: rank {rank} of {ranks} on .*", log)[0])
    return lines


def assert_same_weights(a: dict, b: dict) -> None:
    for key in ("student", "teacher"):
        for name, tensor in b[key].items():
            assert torch.equal(a[key][name], tensor), f"{key}.{name} differs"
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])


@pytest.fixture(scope="module")
def layouts(two_nodes, tmp_path_factory) -> dict[str, tuple[Path, submitit.SlurmJob | None]]:
    """The same run as 2 nodes x 1 process and as 1 node x 2 processes (SLURM queues them),
    and as one process with the global batch (here, while they run)."""
    base = tmp_path_factory.mktemp("slurm_layouts")
    runs = {}
    single = subprocess.Popen(
        [sys.executable, "-m", "dino_locat.training",
         *two_node_argv(base / "one_process", batch_size_per_gpu=16)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for name, nodes, ngpus in (("two_nodes", 2, 1), ("one_node", 1, 2)):
        out = base / name
        proc = launch(*two_node_argv(out), "--cluster", "slurm", "--nodes", nodes, "--ngpus", ngpus)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        job_id, folder = submitted(proc.stdout)["dino"]
        runs[name] = (out, submitit.SlurmJob(folder, job_id, tasks=(0, 1)))
    for _, job in runs.values():
        wait_done(job)
        job.results()
    _, err = single.communicate(timeout=JOB_LIMIT_S)
    assert single.returncode == 0, err[-3000:]
    runs["one_process"] = (base / "one_process", None)
    return runs


def test_two_nodes_train_exactly_as_one_node_with_two_processes(layouts):
    (two, two_job), (one, one_job) = layouts["two_nodes"], layouts["one_node"]
    ranks = rank_lines(two_job.job_id, two_job.paths.folder, 2)
    assert "rank 0 of 2 on node n1" in ranks[0] and "rank 1 of 2 on node n2" in ranks[1]
    assert "(local rank 0, 2 node(s), 1 thread(s)), master n1:" in ranks[1]
    ranks = rank_lines(one_job.job_id, one_job.paths.folder, 2)
    nodes = [re.search(rf"rank {r} of 2 on node (n\d) \(local rank {r}, 1 node", line)[1]
             for r, line in enumerate(ranks)]  # fmt: skip
    assert nodes[0] == nodes[1], ranks
    log = two_job.stdout()
    assert "Batch 8 x 2 process(es) (torchrun/env), 2 it/epoch" in log
    two_ckpt, one_ckpt = (load_checkpoint(p / "checkpoint.pth") for p in (two, one))
    assert two_ckpt["epoch"] == one_ckpt["epoch"] == TWO_NODE_FLAGS["epochs"]
    assert_same_weights(two_ckpt, one_ckpt)
    # The online k-NN ran on both nodes; its curve is that of one process with the global
    # batch (tests/test_training_distributed.py checks the weights that make it).
    single = load_checkpoint(layouts["one_process"][0] / "checkpoint.pth")
    curves = [
        [(h["epoch"], h["teacher_top1"], h["student_top1"]) for h in c["online_knn"]["history"]]
        for c in (two_ckpt, one_ckpt, single)
    ]
    assert curves[0] == curves[1] == curves[2], curves
    assert [epoch for epoch, _, _ in curves[0]] == [0, 2, 4]
    raw = {c["online_knn"]["raw_pixels"] for c in (two_ckpt, one_ckpt, single)}
    assert len(raw) == 1 and None not in raw


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def crash_node(job_id: str, node: str) -> list[int]:
    """What a power cut does to ``node``: SIGKILL its slurmd and the job's processes there
    (each task and the slurmstepd that runs it). Returns the killed PIDs."""
    tasks = [
        int(pid)
        for pid in os.listdir("/proc")
        if pid.isdigit()
        and environ(int(pid)).get("SLURM_JOB_ID") == job_id
        and environ(int(pid)).get("SLURMD_NODENAME") == node
        and "SLURM_PROCID" in environ(int(pid))
    ]
    assert tasks, f"no task of job {job_id} runs on {node}"
    slurmd = int((RUN_DIR / f"slurmd-{node}.pid").read_text())
    victims = [slurmd, *{parent(task) for task in tasks}, *tasks]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    return victims


def node_state(node: str) -> str:
    return subprocess.run(
        ["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True, text=True, timeout=30
    ).stdout.split()[0]


def restart_slurmd(node: str) -> None:
    """Boot the node again (no-op if its slurmd runs) and wait until SLURM can use it."""
    try:
        os.kill(int((RUN_DIR / f"slurmd-{node}.pid").read_text()), 0)
    except (OSError, ValueError):
        subprocess.run(["slurmd", "-N", node], check=True, timeout=60)
    deadline = time.monotonic() + 60
    while node_state(node) not in ("idle", "mix", "alloc"):
        assert time.monotonic() < deadline, f"node {node} did not come back: {node_state(node)}"
        time.sleep(1)


def sacct_runs(job_id: str) -> list[tuple[str, str, str]]:
    """(state, start, end) of every run of the job, requeued ones included."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State,Start,End"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.splitlines()
    return [tuple(line.split("|")) for line in out]


def final_sacct_runs(job_id: str) -> list[tuple[str, str, str]]:
    """:func:`sacct_runs` once SLURM has closed the last run: the tasks' results are written
    (and the job looks done to submitit) a moment before SLURM records how it ended."""
    deadline = time.monotonic() + 60
    while (runs := sacct_runs(job_id))[-1][0] in ("RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, f"job {job_id} never left {runs[-1][0]}"
        time.sleep(1)
    return runs


def test_a_node_crash_requeues_the_job_which_resumes_to_the_same_weights(layouts, tmp_path):
    reference, _ = layouts["two_nodes"]
    out = tmp_path / "dino"
    proc = launch(*two_node_argv(out), "--cluster", "slurm", "--nodes", 2, "--ngpus", 1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id, folder = submitted(proc.stdout)["dino"]
    job = submitit.SlurmJob(folder, job_id, tasks=(0, 1))
    deadline = time.monotonic() + JOB_LIMIT_S
    try:
        while not (out / "checkpoint.pth").exists():  # first epoch done: crash mid-run
            assert not job.done(force_check=True), "the training finished or died before the crash"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        crash_node(job_id, "n2")
        while not any(state == "NODE_FAIL" for state, _, _ in sacct_runs(job_id)):
            assert time.monotonic() < deadline, f"SLURM never saw n2 fail: {sacct_runs(job_id)}"
            time.sleep(1)
    finally:
        restart_slurmd("n2")
    wait_done(job)
    job.results()
    assert [state for state, _, _ in final_sacct_runs(job_id)] == ["NODE_FAIL", "COMPLETED"]
    err = job.task(0).stderr()
    assert "rank 0 of 2 on node n1: another rank (of 1 on n2) died or stopped answering" in err
    assert "exiting without a result" in err
    log = job.task(0).stdout()
    resumed_at = int(re.search(r"\(resuming at epoch (\d+)\)", log)[1])
    assert 1 <= resumed_at < TWO_NODE_FLAGS["epochs"], log
    assert log.count("[launch] job") == 2, "rank 0 did not run exactly twice"
    resumed, uninterrupted = (load_checkpoint(p / "checkpoint.pth") for p in (out, reference))
    assert resumed["epoch"] == uninterrupted["epoch"] == TWO_NODE_FLAGS["epochs"]
    assert_same_weights(resumed, uninterrupted)


def seconds_per_step(run: Path, steps_per_epoch: int) -> float:
    """How long one single-process training step of a finished run took (its log.txt)."""
    epochs = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    return min(e["epoch_time_s"] for e in epochs) / steps_per_epoch


def test_a_one_minute_limit_finishes_a_longer_run_through_requeues(chained_run, tmp_path):
    reference, _ = chained_run
    out = tmp_path / "dino"
    # ~75 s of training on this machine, timed by the uninterrupted run (10 steps an epoch):
    # SLURM warns at 15-45 s into each run (it checks limits every 30 s), so it cannot fit.
    per_step = seconds_per_step(reference, 160 // 16)
    epochs = max(20, int(TIME_LIMITED_S / (4 * per_step)))
    argv = tiny_argv(out, epochs=epochs, subset=64, batch_size_per_gpu=16)  # 4 steps an epoch
    proc = launch(*argv, "--cluster", "slurm", "--timeout", 1, "--max_requeue", 10)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id, folder = submitted(proc.stdout)["dino"]
    job = submitit.SlurmJob(folder, job_id)
    wait_done(job, limit_s=2 * JOB_LIMIT_S)
    job.result()
    runs = final_sacct_runs(job_id)
    assert len(runs) >= 2 and runs[-1][0] == "COMPLETED", runs
    assert [state for state, _, _ in runs[:-1]] == ["REQUEUED"] * (len(runs) - 1), runs
    seconds = [
        (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
        for _, start, end in runs
    ]
    assert all(s <= 60 for s in seconds), f"a run outlived its 1-minute limit: {seconds}"
    assert sum(seconds) > 60, f"the whole run was not longer than the limit: {seconds}"
    assert job.stderr().count("this job is timed-out") == len(runs) - 1
    log = job.stdout()
    assert log.count("requeueing: the next run resumes from") == len(runs) - 1
    starts = [int(e) for e in re.findall(r"\(resuming at epoch (\d+)\)", log)]
    assert len(starts) == len(runs) - 1, starts
    progress = list(itertools.pairwise([0, *starts]))
    assert all(a < b for a, b in progress), f"a run made no progress: {starts}"
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == epochs
