"""Resuming with other flags: refused with the flags named, unless --accept_changed_flags;
the position-embedding rule training uses is recorded and the evaluators follow it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from conftest import one_thread_env, tiny_training_argv

from dino_locat.checkpoint import load_pretrained_backbone


def train(out: Path, **flags) -> subprocess.CompletedProcess:
    argv = tiny_training_argv(out, subset=16, **flags)
    return subprocess.run(
        [sys.executable, "-m", "dino_locat.training", *argv],
        capture_output=True,
        text=True,
        env=one_thread_env(),
        timeout=300,
    )


def test_changed_flags_are_refused_by_name_then_accepted_on_request(tmp_path):
    out = tmp_path / "run"
    assert train(out).returncode == 0
    path = out / "checkpoint.pth"
    before = path.read_bytes()

    refused = train(out, epochs=2, lr=0.01, seed=5)
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    for part in ("--epochs 1 -> 2", "--lr 0.05 -> 0.01", "--seed 0 -> 5", "--accept_changed_flags"):
        assert part in lines[0]
    assert path.read_bytes() == before, "a refused resume must not touch the checkpoint"

    accepted = subprocess.run(
        [
            sys.executable,
            "-m",
            "dino_locat.training",
            *tiny_training_argv(out, subset=16, epochs=2),
            "--accept_changed_flags",
        ],
        capture_output=True,
        text=True,
        env=one_thread_env(),
        timeout=300,
    )
    assert accepted.returncode == 0, accepted.stderr
    assert "with changed flags (--accept_changed_flags): --epochs 1 -> 2" in accepted.stdout
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 2
    assert ckpt["flag_changes"] == [{"epoch": 1, "changes": {"epochs": [1, 2]}}]


def test_another_number_of_processes_or_shape_is_refused(tmp_path):
    out = tmp_path / "run"
    assert train(out).returncode == 0
    path = out / "checkpoint.pth"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["world_size"] == 1
    ckpt["world_size"] = 2
    torch.save(ckpt, path)
    refused = train(out, epochs=2)
    assert refused.returncode != 0 and "number of processes 2 -> 1" in refused.stderr
    shape = train(out, epochs=2, out_dim=128)
    assert shape.returncode != 0 and "--out_dim 256 -> 128" in shape.stderr
    assert "trained with other shapes" in shape.stderr


def test_training_uses_and_records_dinos_position_embedding_rule(tmp_path):
    dino, timm = tmp_path / "dino", tmp_path / "timm"
    assert train(dino).returncode == 0
    assert train(timm, pos_embed_interpolation="timm").returncode == 0
    for out, rule in ((dino, "dino"), (timm, "timm")):
        ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
        assert ckpt["args"]["pos_embed_interpolation"] == rule
        model, info = load_pretrained_backbone(out / "checkpoint.pth", image_size=16)
        assert info["pos_embed_interpolation"] == model.pos_embed_interpolation == rule
    # A checkpoint from before the rule was recorded trained with timm's, and resumes so.
    path = dino / "checkpoint.pth"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["args"]["pos_embed_interpolation"]
    torch.save(ckpt, path)
    _, info = load_pretrained_backbone(path, image_size=16)
    assert info["pos_embed_interpolation"] == "timm"
    refused = train(dino, epochs=2)
    assert "--pos_embed_interpolation 'timm' -> 'dino'" in refused.stderr
    # The two rules give local crops different embeddings (so the choice matters).
    a, _ = load_pretrained_backbone(dino / "checkpoint.pth", pos_embed_interpolation="dino")
    b, _ = load_pretrained_backbone(dino / "checkpoint.pth", pos_embed_interpolation="timm")
    assert not torch.allclose(a.interpolate_pos_embed((2, 2)), b.interpolate_pos_embed((2, 2)))
