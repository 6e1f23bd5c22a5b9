"""--compile: a compiled run killed mid-epoch and restarted ends with the weights of an
uninterrupted compiled run (the resume guarantee), its checkpoints hold plain keys, and
checkpoints with torch.compile's ``_orig_mod.`` keys load for resume and evaluation.

Real subprocesses and inductor on the CPU. The run is as small as a DINO run gets
(2-block LocAtViT-T, 32 px, no local crops) because compiling, not training, is the cost;
inductor's on-disk cache makes the second and third processes compile faster.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from conftest import kill_at_line, one_thread_env, tiny_training_argv

from dino_locat.checkpoint import load_pretrained_backbone, save_checkpoint

EPOCHS, STEPS = 2, 4  # 16 images / batch 4


def command(out: Path) -> list[str]:
    argv = tiny_training_argv(out, subset=16, epochs=EPOCHS, local_crops_number=0, seed=5)
    return [sys.executable, "-u", "-m", "dino_locat.training", *argv, "--compile"]


def run_to_end(out: Path) -> str:
    proc = subprocess.run(
        command(out), capture_output=True, text=True, env=one_thread_env(), timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def kill_in_epoch_two(out: Path) -> None:
    """SIGKILL the run at its first step of epoch 2 (epoch 1 is checkpointed by then)."""
    kill_at_line(command(out), f"Epoch [2/{EPOCHS}] [1/{STEPS}]")


def with_compile_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as ``torch.compile(module)`` wrappers save them."""
    return {f"_orig_mod.{key}": value for key, value in state.items()}


def test_compiled_run_resumes_exactly_and_saves_plain_keys(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    stdout = run_to_end(straight)
    assert "Training finished" in stdout

    kill_in_epoch_two(resumed)
    path = resumed / "checkpoint.pth"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 1
    # A checkpoint written by a torch.compile(model) wrapper resumes just the same.
    ckpt["student"] = with_compile_prefix(ckpt["student"])
    ckpt["teacher"] = with_compile_prefix(ckpt["teacher"])
    save_checkpoint(ckpt, path)
    assert "resuming at epoch 1" in run_to_end(resumed)

    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(path, weights_only=True)
    assert a["epoch"] == b["epoch"] == EPOCHS and a["args"]["compile"]
    for key in ("student", "teacher", "dino_loss"):
        assert not [name for name in a[key] if "_orig_mod" in name]
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name}"
    moved = (
        a["student"]["backbone.blocks.1.attn.gaug.log_var.weight"]
        - (ckpt["student"]["_orig_mod.backbone.blocks.1.attn.gaug.log_var.weight"])
    )
    assert moved.abs().max() > 0, "epoch 2 changed the weights"

    # The compiled run's checkpoint, and a prefixed bare backbone, load for evaluation.
    model, info = load_pretrained_backbone(straight / "checkpoint.pth")
    assert info["arch"] == "locatvit_t" and info["depth"] == 2
    bare = tmp_path / "bare.pth"
    torch.save(with_compile_prefix(model.state_dict()), bare)
    again, _ = load_pretrained_backbone(bare)
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name])
