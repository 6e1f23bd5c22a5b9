"""Real DINO runs on real image files: artefacts, TensorBoard, checkpoint safety, NaN stop."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_training_argv
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dino_locat.checkpoint import CheckpointError
from dino_locat.training import NonFiniteLossError, get_args_parser, main
from dino_locat.training.args import resolve_args
from dino_locat.training.loop import build_student_teacher

OUT_DIM = 256
DINO_KEYS = {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"}


@pytest.fixture(scope="module")
def one_epoch_run(shared_image_folder, tmp_path_factory) -> tuple[Path, str]:
    """One epoch (18 images, batch 4 -> 4 steps) with the locality figures hook on."""
    out = tmp_path_factory.mktemp("run") / "dino"
    argv = tiny_training_argv(out, shared_image_folder, vis_freq=1)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = main(get_args_parser().parse_args(argv))
    assert result["checkpoint"] == str(out / "checkpoint.pth")
    return out, buffer.getvalue()


def test_epoch_prints_progress_and_the_next_command(one_epoch_run):
    out, stdout = one_epoch_run
    assert "Epoch [1/1] [1/4]" in stdout and "it/s" in stdout and "eta 0:" in stdout
    assert f"Checkpoint:  {out / 'checkpoint.pth'}" in stdout
    assert f"tensorboard --logdir {out / 'tensorboard'}" in stdout
    assert f"python eval/knn.py --pretrained_weights {out / 'checkpoint.pth'}" in stdout
    assert "Longer runs:" not in stdout  # a --data_path run is the user's own
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(records) == 1 and records[0]["epoch"] == 0
    assert math.isfinite(records[0]["train_loss"]) and records[0]["images_per_s"] > 0


def test_checkpoint_has_dino_keys_and_loads_with_weights_only(one_epoch_run):
    out, _ = one_epoch_run
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    # DINO's keys (no fp16_scaler on CPU) plus the online k-NN curve, training seconds, the
    # number of processes and the flag changes accepted on resume (none).
    assert set(ckpt) == DINO_KEYS | {"online_knn", "train_seconds", "world_size", "flag_changes"}
    assert ckpt["world_size"] == 1 and ckpt["flag_changes"] == []
    assert ckpt["epoch"] == 1 and set(ckpt["dino_loss"]) == {"center"}
    args = ckpt["args"]
    assert (args["arch"], args["patch_size"], args["global_crops_size"]) == ("locatvit_t", 8, 32)
    assert all(k.startswith(("backbone.", "head.")) for k in ckpt["teacher"])
    student, teacher = build_student_teacher(
        resolve_args(get_args_parser().parse_args(tiny_training_argv(out, out)))[0]
    )
    student.load_state_dict(ckpt["student"])
    teacher.load_state_dict(ckpt["teacher"])
    assert not torch.equal(
        ckpt["student"]["backbone.pos_embed"], ckpt["teacher"]["backbone.pos_embed"]
    )


def test_tensorboard_has_schedules_speed_and_gaug_statistics(one_epoch_run):
    out, _ = one_epoch_run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/lr",
        "train/weight_decay",
        "train/momentum",
        "train/teacher_temp",
        "perf/step_time_s",
        "perf/images_per_s",
        "gaug/var_mean/block00",
        "gaug/alpha_mean/block01",
        "epoch/train_loss",
    }
    assert expected <= scalars
    assert {"gaug/var/block00", "gaug/alpha/block01"} <= set(events.Tags()["histograms"])
    assert any(tag.startswith("locality/") for tag in events.Tags()["images"])
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [0, 1, 2, 3]
    # At initialisation the student is near-uniform over K prototypes: loss ~ ln K, a little
    # below it because the teacher's temperature (0.04) already sharpens the random cosines
    # between the bottleneck code and the prototypes (about half their variance, in nats).
    assert 0.8 * math.log(OUT_DIM) < losses[0].value <= 1.02 * math.log(OUT_DIM)
    var_mean = events.Scalars("gaug/var_mean/block00")[0].value
    assert 0.5 < var_mean < 2.0  # zero logits give var = 1 patch^2 at init


def test_calling_main_again_after_the_last_epoch_changes_nothing(
    one_epoch_run, shared_image_folder, capsys
):
    out, _ = one_epoch_run
    before = (out / "checkpoint.pth").read_bytes()
    main(get_args_parser().parse_args(tiny_training_argv(out, shared_image_folder)))
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "checkpoint.pth").read_bytes() == before


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    one_epoch_run, shared_image_folder, tmp_path
):
    out = tmp_path / "dino"
    shutil.copytree(one_epoch_run[0], out)
    before = (out / "checkpoint.pth").read_bytes()
    argv = tiny_training_argv(out, shared_image_folder, epochs=2, lr=1e30)
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf|-inf) at epoch 1") as err:
        main(get_args_parser().parse_args([*argv, "--accept_changed_flags"]))
    assert "still holds the last good state" in str(err.value)
    assert "--lr (now 1e+30; lower it)" in str(err.value) and "--teacher_temp" in str(err.value)
    assert (out / "checkpoint.pth").read_bytes() == before
    assert len((out / "log.txt").read_text().splitlines()) == 1


class Payload:
    """Unpickling this object would create ``path`` (the attack we must refuse)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    out = tmp_path / "dino"
    out.mkdir()
    marker = tmp_path / "payload_ran"
    torch.save({"student": Payload(marker), "epoch": 1}, out / "checkpoint.pth")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = tiny_training_argv(out, subset=8)
    proc = subprocess.run(
        [sys.executable, "-m", "dino_locat.training", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode != 0
    assert f"refused to load {out / 'checkpoint.pth'}" in proc.stderr
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        main(get_args_parser().parse_args(argv))
    assert not marker.exists()
