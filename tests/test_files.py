"""Atomic writes: whole files or none, readable as a plain open() would make them."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from dino_locat.checkpoint import load_checkpoint, save_checkpoint
from dino_locat.evaluation.report import write_json_atomic
from dino_locat.files import atomic_write


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_results_and_checkpoints_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        results = write_json_atomic(tmp_path / "results.json", {"top1": 1.5})
        ckpt = save_checkpoint({"w": torch.ones(2)}, tmp_path / "checkpoint.pth")
    finally:
        os.umask(old)
    assert mode(results) == mode(ckpt) == 0o644
    assert json.loads(results.read_text()) == {"top1": 1.5}
    assert torch.equal(load_checkpoint(ckpt)["w"], torch.ones(2))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = atomic_write(tmp_path / "table.md", lambda handle: handle.write(b"old"))

    def crash(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["table.md"]
