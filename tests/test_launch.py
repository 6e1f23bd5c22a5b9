"""The submitit launchers on this machine: real training and k-NN jobs on the local executor.

Everything goes through the real command lines (``launch/dino.py``, ``launch/eval.py``) in a
subprocess, exactly as a user types them; the SLURM side is in test_slurm.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_training_argv

from dino_locat.checkpoint import load_checkpoint
from dino_locat.launching import launch_training
from dino_locat.launching.submission import (
    evaluation_launch_parser,
    exit_with,
    training_launch_parser,
)

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
KNN_FLAGS = "--train_subset 300 --test_subset 100 --nb_knn 5 10 --num_workers 0"
SUBMISSION_FLAGS = (
    "--cluster --nodes --ngpus --cpus_per_task --partition --timeout --mem --slurm_account "
    "--slurm_qos --slurm_constraint --slurm_comment --job_dir --max_requeue --wait"
).split()


def run_cli(script: str, *argv: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / script), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def help_sections(text: str) -> dict[str, str]:
    """argparse help split into {section title: its body}."""
    parts = re.split(r"^(\S[^\n]*):\n", text, flags=re.M)
    return {title: body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny DINO training then a k-NN evaluation, chained on the local executor."""
    out = tmp_path_factory.mktemp("local") / "dino"
    argv = tiny_training_argv(out, epochs=EPOCHS, subset=48, batch_size_per_gpu=16)
    proc = run_cli(
        "dino.py", *argv, "--cluster", "local", "--eval", "knn", "--eval_args", f"knn={KNN_FLAGS}"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_dino_help_lists_submission_flags_in_their_own_group():
    proc = run_cli("dino.py", "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    sections = help_sections(proc.stdout)
    submission = sections["submission"]
    for flag in SUBMISSION_FLAGS:
        assert f"  {flag}" in submission, flag
    assert "--arch" not in submission and "--epochs" not in submission
    assert "--eval NAMES" in sections["evaluation after training"]
    assert not any("--cluster" in body for title, body in sections.items() if title != "submission")


def test_eval_launcher_help_has_the_evaluator_flags_and_the_same_submission_group(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluation_launch_parser().parse_args(["knn", "--help"])
    assert exit_info.value.code == 0
    sections = help_sections(capsys.readouterr().out)
    assert "--pretrained_weights" in sections["backbone"]
    assert "--nb_knn" in sections["k-NN"]
    for flag in SUBMISSION_FLAGS:
        assert f"  {flag}" in sections["submission"], flag


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs must be positive"),
        (["--nodes", "2", "--cluster", "local"], "--nodes 2 needs --cluster slurm"),
        (["--timeout", "0"], "--timeout must be >= 1"),
        (["--eval", "knn", "--eval_args", "linear=--epochs 1"], "linear is not in --eval"),
        (["--eval", "knn", "--eval_args", "knn=--nb_knn"], "--nb_knn: expected at least one"),
        (["--eval", "knn,bogus"], "unknown evaluator(s) bogus"),
    ],
)
def test_bad_flags_fail_before_anything_is_submitted(tmp_path, capsys, flags, message):
    """What ``launch/dino.py`` does with these flags, in this process: exit 2, nothing queued."""
    out = tmp_path / "dino"
    argv = [*map(str, tiny_training_argv(out)), "--cluster", "local", *flags]
    with pytest.raises(SystemExit) as exit_info:
        exit_with(launch_training, training_launch_parser().parse_args(argv))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (out / "jobs").exists(), "a job folder was created for a rejected command"


def test_local_training_streams_its_log_and_leaves_a_checkpoint(local_run):
    out, proc = local_run
    job_ids = re.findall(r"\[launch\] submitted (\w+) as job (\d+): log (\S+),", proc.stdout)
    assert [name for name, _, _ in job_ids] == ["dino", "eval_knn"]
    train_log = Path(job_ids[0][2])
    assert train_log.parent.parent == out / "jobs"
    # the job's own output reached this console, not only its log file
    assert f"Epoch [{EPOCHS}/{EPOCHS}]" in proc.stdout
    assert f"Epoch [{EPOCHS}/{EPOCHS}]" in train_log.read_text()
    # the embedded preset's run ends by pointing to what longer runs buy
    assert "Longer runs: " in proc.stdout and "docs/long_run/README.md" in proc.stdout
    assert "--preset long" in proc.stdout
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == EPOCHS
    assert ckpt["args"]["output_dir"] == str(out)
    assert "cluster" not in ckpt["args"], "submission flags leaked into the training args"


def test_local_knn_runs_after_training_and_writes_its_result(local_run):
    out, proc = local_run
    results = json.loads((out / "eval_knn" / "results.json").read_text())
    assert results["evaluation"] == "knn" and results["epoch"] == EPOCHS
    assert Path(results["checkpoint"]) == out / "checkpoint.pth"
    assert set(results["knn"]) == {"5", "10"}
    assert all(0.0 <= v["top1"] <= 100.0 for v in results["knn"].values())
    assert proc.stdout.index("[launch] job") < proc.stdout.index("submitted eval_knn")
    ckpt_time = (out / "checkpoint.pth").stat().st_mtime
    assert (out / "eval_knn" / "results.json").stat().st_mtime >= ckpt_time


def test_eval_launcher_runs_knn_on_a_checkpoint_in_debug_mode(local_run, tmp_path):
    """``launch/eval.py knn ... --cluster debug``: the job runs inside the command itself."""
    out, _ = local_run
    result_dir = tmp_path / "knn"
    flags = [*KNN_FLAGS.split(), "--nb_knn", "3", "--output_dir", result_dir]
    ckpt = out / "checkpoint.pth"
    proc = run_cli("eval.py", "knn", "--pretrained_weights", ckpt, *flags, "--cluster", "debug")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "3-NN  top-1" in proc.stdout
    results = json.loads((result_dir / "results.json").read_text())
    assert list(results["knn"]) == ["3"] and results["epoch"] == EPOCHS
    assert list((result_dir / "jobs").iterdir()), "job files belong under the eval output_dir"


def test_eval_launcher_runs_hummingbird_in_debug_mode(local_run, tmp_path):
    out, _ = local_run
    flags = "--train_scenes 8 --test_scenes 4 --input_size 32 --num_workers 0".split()
    ckpt = out / "checkpoint.pth"
    proc = run_cli(
        "eval.py", "hummingbird", "--pretrained_weights", ckpt, *flags,
        "--output_dir", tmp_path / "hb", "--cluster", "debug",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((tmp_path / "hb" / "results.json").read_text())["evaluation"] == "hummingbird"
    # ... and it chains after training like the others.
    assert training_launch_parser().parse_args(["--eval", "knn,hummingbird"]).eval == [
        "knn",
        "hummingbird",
    ]


def test_local_job_exception_reaches_the_console_and_the_exit_status(tmp_path):
    data = tmp_path / "broken" / "only_class"
    data.mkdir(parents=True)
    for i in range(8):
        (data / f"bad{i}.png").write_bytes(b"not a png at all")
    out = tmp_path / "dino"
    argv = tiny_training_argv(out, data_path=data.parent, batch_size_per_gpu=4)
    proc = run_cli("dino.py", *argv, "--cluster", "local", timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert "cannot read image file" in proc.stderr and str(data) in proc.stderr
    assert "[launch] job" in proc.stderr and "failed:" in proc.stderr
    assert not (out / "checkpoint.pth").exists()
