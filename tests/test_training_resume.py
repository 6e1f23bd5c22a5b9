"""SIGKILL in the middle of epoch 2, restart, and end with the weights of an uninterrupted
run (real subprocesses, real Fashion-MNIST images, drop path on, loader workers on), with
DINO's step and with both DINOv2 options (KoLeo, Sinkhorn-Knopp targets) on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_at_line, one_thread_env, tiny_training_argv

EPOCHS = 3
STEPS = 12  # 48 images / batch 4


DINOV2_OPTIONS = {"koleo_loss_weight": 0.1, "centering": "sinkhorn_knopp"}


def command(out: Path, workers: int, options: dict) -> list[str]:
    argv = tiny_training_argv(
        out,
        subset=48,
        epochs=EPOCHS,
        warmup_epochs=1,
        num_workers=workers,
        seed=3,
        knn_freq=1,
        knn_train_images=64,
        knn_test_images=32,
        **options,
    )
    return [sys.executable, "-u", "-m", "dino_locat.training", *argv]


def run_to_end(out: Path, workers: int, options: dict) -> str:
    proc = subprocess.run(
        command(out, workers, options),
        capture_output=True,
        text=True,
        env=one_thread_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def kill_during_epoch_two(out: Path, workers: int, options: dict) -> list[str]:
    """Start the run and SIGKILL it once it has logged step 2 of epoch 2."""
    return kill_at_line(command(out, workers, options), f"Epoch [2/{EPOCHS}] [ 2/{STEPS}]")


@pytest.mark.parametrize("options", [{}, DINOV2_OPTIONS], ids=["dino", "koleo+sinkhorn"])
def test_killed_mid_epoch_two_and_restarted_equals_an_uninterrupted_run(tmp_path, options):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_to_end(straight, workers=0, options=options)

    seen = kill_during_epoch_two(resumed, workers=2, options=options)
    assert any(line.startswith("Epoch [1/3] done") for line in seen)
    ckpt = torch.load(resumed / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1, "the kill must land inside epoch 2 (after epoch 1's checkpoint)"

    stdout = run_to_end(resumed, workers=2, options=options)
    assert "resuming at epoch 1" in stdout

    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(resumed / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == EPOCHS
    for key in ("student", "teacher", "dino_loss"):
        for name, value in a[key].items():
            assert torch.allclose(value, b[key][name], rtol=0, atol=1e-6), f"{key}.{name}"
    for index, state in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(
                state[name], b["optimizer"]["state"][index][name], rtol=0, atol=1e-6
            )
    # The weights did move after the kill point (the comparison is not between no-ops).
    moved = (
        a["student"]["backbone.blocks.0.attn.qkv.weight"]
        - ckpt["student"]["backbone.blocks.0.attn.qkv.weight"]
    )
    assert moved.abs().max() > 1e-4
    log_a = [json.loads(line) for line in (straight / "log.txt").read_text().splitlines()]
    log_b = [json.loads(line) for line in (resumed / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log_a] == [r["epoch"] for r in log_b] == list(range(EPOCHS))
    assert [r["train_loss"] for r in log_a] == [r["train_loss"] for r in log_b]
    # The online k-NN ran (untrained + every epoch) and its curve survived the kill.
    curve_a, curve_b = (
        [(h["epoch"], h["teacher_top1"], h["student_top1"]) for h in c["online_knn"]["history"]]
        for c in (a, b)
    )
    assert curve_a == curve_b and [e for e, _, _ in curve_a] == list(range(EPOCHS + 1))
    if options:
        assert a["args"]["centering"] == "sinkhorn_knopp" and log_a[0]["train_koleo"] > 0
        assert [r["train_koleo"] for r in log_a] == [r["train_koleo"] for r in log_b]
