"""Unreadable files end every command with one line and a non-zero exit, never a traceback.

Every reader of checkpoints, as the user starts it (the scripts' own ``__main__``, run in
this process so the whole matrix stays fast), is fed random bytes, bytes that send torch's
unpickler into ``KeyError: 101``, an empty file, a truncated zip, a zip holding a pickled
class that ``weights_only`` forbids, and a folder. Each time: exit status 2, exactly one
line on stderr naming the file, nothing written, the bad file untouched. A few cases also
run as real subprocesses, and an unreadable image raised inside a DataLoader worker.
"""

from __future__ import annotations

import datetime
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_training_argv, write_image_folder

from dino_locat.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dino_locat.launching.study import get_args_parser as study_parser
from dino_locat.launching.study import plan_study
from dino_locat.models import build_backbone

REPO = Path(__file__).resolve().parents[1]
TINY = {"img_size": 32, "patch_size": 8, "depth": 1}
KINDS = ("random", "keyerror", "empty", "truncated_zip", "forbidden_class", "folder")


def write_bad(path: Path, kind: str) -> Path:
    """``path`` made into one kind of unreadable checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "keyerror":  # what the issue saw: torch's unpickler ends in KeyError: 101
        path.write_bytes(b"hello world\n" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated_zip":
        torch.save({"teacher": {"w": torch.zeros(256, 256)}}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "forbidden_class":
        torch.save({"teacher": {}, "made": datetime.datetime(2026, 1, 1)}, path)
    else:
        path.mkdir()
    return path


def good_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_backbone("locatvit_t", **TINY)
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    args = {"arch": "locatvit_t", "patch_size": 8, "global_crops_size": 32, "depth": 1}
    return save_checkpoint({"teacher": state, "epoch": 1, "args": args}, path)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root`` with its size and mtime: what 'nothing written'
    compares."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            seen[os.path.join(folder, name)] = ("dir",)
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            seen[os.path.join(folder, name)] = (stat.st_size, stat.st_mtime_ns)
    return seen


def training_flags(out: Path) -> list[str]:
    return tiny_training_argv(out, depth=1, subset=8, batch_size_per_gpu=4)


def study_argv(out: Path) -> list[str]:
    return ["--output_dir", str(out), "--archs", "vit_t", "--seeds", "0", "--cluster", "local"]


# entry -> (how it is started, where the bad file goes, its argv); `root` is a fresh folder
# that already holds a good checkpoint at root/good.pth.
Entry = tuple[str, Callable[[Path], Path], Callable[[Path, Path], list[str]]]
ENTRIES: dict[str, Entry] = {
    **{
        f"eval/{name}.py": (
            f"eval/{name}.py",
            lambda root: root / "weights" / "bad.pth",
            lambda root, bad, name=name: ["--pretrained_weights", str(bad), "--num_workers", "0"],
        )
        for name in ("knn", "linear", "segmentation", "hummingbird")
    },
    "eval/visualize.py": (
        "eval/visualize.py",
        lambda root: root / "weights" / "bad.pth",
        lambda root, bad: ["--pretrained_weights", str(bad), "--output_dir", str(root / "figs")],
    ),
    "eval/export.py": (
        "eval/export.py",
        lambda root: root / "weights" / "bad.pth",
        lambda root, bad: ["--pretrained_weights", str(bad), "--output", str(root / "x.pth")],
    ),
    "eval/knn.py --load_features": (
        "eval/knn.py",
        lambda root: root / "features" / "train_features.pth",
        lambda root, bad: ["--load_features", str(bad.parent)],
    ),
    "eval/linear.py --evaluate": (
        "eval/linear.py",
        lambda root: root / "head" / "linear_head.pth",
        lambda root, bad: [
            *("--evaluate", "--pretrained_weights", str(root / "good.pth")),
            *("--pretrained_linear", str(bad), "--output_dir", str(root / "linear")),
        ],
    ),
    "eval/gaug_trends.py": (
        "eval/gaug_trends.py",
        lambda root: root / "run" / "checkpoint.pth",
        lambda root, bad: ["--run_dir", str(bad.parent), "--output_dir", str(root / "trends")],
    ),
    "eval/knn_curves.py": (
        "eval/knn_curves.py",
        lambda root: root / "run" / "checkpoint.pth",
        lambda root, bad: ["--runs", str(bad.parent), "--output_dir", str(root / "curves")],
    ),
    "python -m dino_locat.training": (
        "dino_locat.training",
        lambda root: root / "run" / "checkpoint.pth",
        lambda root, bad: training_flags(bad.parent),
    ),
    "launch/dino.py": (
        "launch/dino.py",
        lambda root: root / "run" / "checkpoint.pth",
        lambda root, bad: [*training_flags(bad.parent), "--cluster", "local"],
    ),
    "launch/eval.py": (
        "launch/eval.py",
        lambda root: root / "weights" / "bad.pth",
        lambda root, bad: ["knn", "--pretrained_weights", str(bad), "--cluster", "local"],
    ),
    "launch/study.py": (
        "launch/study.py",
        lambda root: next(
            piece.checkpoint
            for piece in plan_study(study_parser().parse_args(study_argv(root / "study")))
            if piece.kind == "train"
        ),
        lambda root, bad: study_argv(root / "study"),
    ),
}


def start(entry: str, argv: list[str], monkeypatch) -> None:
    """Run ``entry`` as ``python ENTRY ARGV`` would, in this process."""
    monkeypatch.setattr(sys, "argv", [entry, *argv])
    if entry.endswith(".py"):
        runpy.run_path(str(REPO / entry), run_name="__main__")
    else:
        runpy.run_module(entry, run_name="__main__", alter_sys=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_every_reader_ends_with_one_line(entry, kind, tmp_path, monkeypatch, capfd):
    script, where, argv = ENTRIES[entry]
    good_checkpoint(tmp_path / "good.pth")
    bad = write_bad(where(tmp_path), kind)
    before = snapshot(tmp_path)
    content = None if bad.is_dir() else bad.read_bytes()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        start(script, argv(tmp_path, bad), monkeypatch)
    err = capfd.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and err.endswith("\n") and err.count("\n") == 1, err
    named = bad.parent if kind == "folder" and "pretrained_weights" in argv(tmp_path, bad) else bad
    assert str(named) in err or (entry.endswith("--load_features") and str(bad.parent) in err)
    assert snapshot(tmp_path) == before, "something was written"
    assert content is None or bad.read_bytes() == content


def test_each_kind_says_what_is_wrong(tmp_path):
    said = {
        "random": "neither a torch checkpoint (zip or pickle) nor a safetensors file",
        "keyerror": "neither a torch checkpoint",
        "empty": "the file is empty",
        "truncated_zip": "a damaged or truncated zip archive",
        "forbidden_class": "holds a pickled datetime.datetime",
        "folder": "is a folder, not a checkpoint file",
    }
    for kind, message in said.items():
        bad = write_bad(tmp_path / f"{kind}.pth", kind)
        with pytest.raises(CheckpointError, match=re.escape(message)) as info:
            load_checkpoint(bad, hint="do this")
        assert str(bad) in str(info.value) and str(info.value).endswith("; do this")
        assert "\n" not in str(info.value)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="a damaged .safetensors file"):
        load_checkpoint(damaged)


def run(*argv: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *map(str, argv)], capture_output=True, text=True, env=env, timeout=300
    )


def test_real_processes_print_one_line(tmp_path):
    """The issue's cases as a user meets them, in fresh processes."""
    bad = write_bad(tmp_path / "notes.pth", "keyerror")
    proc = run(REPO / "eval" / "knn.py", "--pretrained_weights", bad)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot read checkpoint {bad}:" in proc.stderr
    out = tmp_path / "run"
    write_bad(out / "checkpoint.pth", "truncated_zip")
    before = (out / "checkpoint.pth").read_bytes()
    proc = run("-m", "dino_locat.training", *training_flags(out))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{out / 'checkpoint.pth'}" in proc.stderr
    assert "move it aside or choose another --output_dir" in proc.stderr
    assert (out / "checkpoint.pth").read_bytes() == before and os.listdir(out) == ["checkpoint.pth"]


def test_unreadable_image_is_one_line_also_from_a_loader_worker(tmp_path):
    """torch re-raises a worker's error with the worker's traceback as its message; the
    command still prints only the message we raised."""
    workers = 1
    images = write_image_folder(tmp_path / "images", per_class=2)
    (images / "stripes" / "001.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    proc = run("-m", "dino_locat.training", *tiny_training_argv(
        out, images, depth=1, batch_size_per_gpu=2, num_workers=workers
    ))  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"cannot read image file {images / 'stripes' / '001.jpg'}" in proc.stderr
    assert "--skip_corrupt" in proc.stderr
    # an evaluator's loader workers too
    data = tmp_path / "data"
    write_image_folder(data / "train", per_class=2)
    write_image_folder(data / "val", per_class=1)
    (data / "val" / "circles" / "000.png").write_bytes(b"")
    good = good_checkpoint(tmp_path / "good.pth")
    proc = run(REPO / "eval" / "knn.py", "--pretrained_weights", good, "--data_path", data,
               "--num_workers", workers, "--nb_knn", "2")  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot read image file {data / 'val' / 'circles' / '000.png'}" in proc.stderr
