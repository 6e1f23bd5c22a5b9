"""Learning signals, collapse alarms and the online k-NN: constructed outputs and real runs."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_training_argv
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dino_locat.data.folders import spread_indices
from dino_locat.models.head import DINOHead
from dino_locat.training import get_args_parser, main
from dino_locat.training.loss import DINOLoss
from dino_locat.training.online_knn import (
    FASHION_MNIST_TRAIN,
    build_knn_probe,
    embedded_bank_indices,
)
from dino_locat.training.signals import (
    AlarmMonitor,
    LearningSignals,
    diagnose,
    teacher_entropies,
)
from dino_locat.visualization.knn_curves import (
    RunCurve,
    curves_data,
    markdown_table,
    read_run,
    read_runs,
    run_styles,
    seed_groups,
    write_curves,
)

K, BATCH, NCROPS = 64, 32, 4


def signals_of(student: torch.Tensor, teacher: torch.Tensor) -> LearningSignals:
    loss_fn = DINOLoss(K, NCROPS, 0.04, 0.04, 0, 10)
    loss_fn(student, teacher, epoch=0)
    return LearningSignals.from_rows(loss_fn.last_signals.reshape(1, 3), K)


def test_signals_match_their_definitions():
    torch.manual_seed(0)
    student, teacher = torch.randn(NCROPS * BATCH, K), 0.1 * torch.randn(2 * BATCH, K)
    signals = signals_of(student, teacher)
    probs = F.softmax(teacher / 0.04, dim=-1)  # centre is 0 before the first update
    entropy = -(probs * probs.log()).sum(-1).mean().item()
    mean = probs.mean(0)
    assert signals.teacher_entropy == pytest.approx(entropy, rel=1e-5)
    assert signals.prototypes_in_use == pytest.approx(math.exp(-(mean * mean.log()).sum()), 1e-5)
    # KL(teacher || student) over the cross-view pairs, written out.
    kl, pairs = 0.0, 0
    for a in range(2):
        q = probs[a * BATCH : (a + 1) * BATCH]
        for b in range(NCROPS):
            if b != a:
                logp = F.log_softmax(student[b * BATCH : (b + 1) * BATCH] / 0.1, dim=-1)
                kl += (q * (q.log() - logp)).sum(-1).mean().item()
                pairs += 1
    assert signals.kl == pytest.approx(kl / pairs, rel=1e-4)
    assert signals.loss_fraction == pytest.approx(signals.loss / math.log(K))


def test_uniform_teacher_raises_the_uniform_alarm():
    signals = signals_of(torch.zeros(NCROPS * BATCH, K), torch.zeros(2 * BATCH, K))
    assert signals.teacher_entropy == pytest.approx(math.log(K), rel=1e-6)
    assert abs(signals.kl) < 1e-5
    alarms = diagnose(signals, {"teacher_temp": 0.04})
    assert [a.kind for a in alarms] == ["uniform"]
    assert "--teacher_temp (now 0.04)" in alarms[0].message and "--lr" in alarms[0].message


def test_teacher_on_one_prototype_raises_the_collapse_alarm():
    teacher = torch.zeros(2 * BATCH, K)
    teacher[:, 3] = 5.0  # every image, both views: prototype 3
    signals = signals_of(torch.randn(NCROPS * BATCH, K), teacher)
    assert signals.prototypes_in_use < 1.01
    alarms = diagnose(signals)
    assert [a.kind for a in alarms] == ["collapse"]
    assert "--momentum_teacher" in alarms[0].message and "--out_dim" in alarms[0].message


def test_confident_diverse_teacher_raises_no_alarm():
    torch.manual_seed(1)
    teacher = torch.zeros(2 * BATCH, K)
    teacher[torch.arange(2 * BATCH), torch.randint(0, K, (2 * BATCH,))] = 1.0
    signals = signals_of(torch.randn(NCROPS * BATCH, K), teacher)
    assert signals.teacher_entropy < 0.5 * math.log(K) and signals.prototypes_in_use > 10
    assert diagnose(signals) == []


def test_monitor_waits_for_warmup_and_repeats_once_per_epoch():
    uniform = LearningSignals(math.log(K), math.log(K), math.log(K), K)
    monitor = AlarmMonitor(start_step=10, flags={})
    assert monitor.check(uniform, step=9, epoch=0) == ([], [])
    active, fresh = monitor.check(uniform, step=10, epoch=0)
    assert [a.kind for a in active] == [a.kind for a in fresh] == ["uniform"]
    assert monitor.check(uniform, step=11, epoch=0)[1] == []
    assert [a.kind for a in monitor.check(uniform, step=20, epoch=1)[1]] == ["uniform"]


def test_entropies_stay_on_the_device_tensor_path():
    probs = F.softmax(torch.randn(8, K), dim=-1)
    per_image, batch = teacher_entropies(probs)
    assert per_image.shape == batch.shape == ()
    assert 0 < per_image.item() <= batch.item() <= math.log(K) + 1e-6


def test_head_last_layer_keeps_nn_linear_default_init():
    torch.manual_seed(0)
    head = DINOHead(32, 4096, hidden_dim=64, bottleneck_dim=256)
    weight = head.last_layer.weight_v
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), +)
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.99 * bound  # uniform, not a std-0.02 normal
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert torch.all(head.last_layer.weight_g == 1)
    for layer in (m for m in head.mlp if isinstance(m, torch.nn.Linear)):
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.all(layer.bias == 0)


def test_bank_and_held_out_queries_avoid_the_pretraining_subset_and_each_other():
    used = set(spread_indices(FASHION_MNIST_TRAIN, 2048))
    bank, queries, overlaps = embedded_bank_indices(2048, 500)
    assert len(bank) == len(set(bank)) == 500 and not overlaps and queries == []
    assert not used & set(bank)
    bank, queries, overlaps = embedded_bank_indices(2048, 500, 300)
    assert len(queries) == len(set(queries)) == 300 and not overlaps
    assert not used & set(queries) and not set(bank) & set(queries)
    everything, queries, overlaps = embedded_bank_indices(0, 500, 300)
    assert len(everything) == 500 and overlaps and not set(everything) & set(queries)


def test_held_out_train_queries_come_from_the_train_split():
    args = argparse.Namespace(
        knn_freq=1, global_crops_size=16, knn_data_path=None, data_path=None, subset=2048,
        num_workers=0,
        knn_train_images=40, knn_test_images=30, knn_queries="train",
    )  # fmt: skip
    probe = build_knn_probe(args)
    assert probe.splits["queries"].split == "train" and len(probe.splits["queries"]) == 30
    assert "30 held-out train queries" in probe.description
    args.knn_test_images = 0
    with pytest.raises(ValueError, match="--knn_test_images"):
        build_knn_probe(args)


def run(tmp_path, **flags) -> tuple[str, list[dict]]:
    out = tmp_path / "run"
    argv = tiny_training_argv(out, **flags)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(get_args_parser().parse_args(argv))
    lines = (out / "log.txt").read_text().splitlines()
    return buffer.getvalue(), [json.loads(line) for line in lines]


def test_online_knn_curve_in_console_log_tensorboard_and_checkpoint(tmp_path):
    stdout, records = run(
        tmp_path, subset=64, epochs=2, knn_freq=1, knn_train_images=100, knn_test_images=50
    )
    assert "k-NN 20-NN top-1 (untrained): teacher" in stdout
    last = stdout.strip().splitlines()
    summary = [line for line in last if line.startswith("k-NN 20-NN top-1: untrained")]
    assert len(summary) == 1 and "-> teacher" in summary[0] and "(raw pixels" in summary[0]
    assert all(0 <= r["knn_teacher_top1"] <= 100 for r in records)
    assert {"train_teacher_entropy", "train_prototypes_in_use", "train_kl_teacher_student"} <= set(
        records[0]
    )
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    history = ckpt["online_knn"]["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[0]["teacher_top1"] == history[0]["student_top1"]
    assert history[-1]["teacher_top1"] == records[-1]["knn_teacher_top1"]
    assert 0 < ckpt["online_knn"]["raw_pixels"] <= 100
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"knn/teacher_top1", "knn/student_top1", "knn/raw_pixels_top1"} <= scalars
    assert {"signals/teacher_entropy", "signals/prototypes_in_use"} <= scalars
    assert {"signals/kl_teacher_student", "signals/loss_over_lnK", "alarm/uniform"} <= scalars
    assert len(events.Scalars("knn/teacher_top1")) == 3

    # The sweep tool reads the same history back: table, JSON and figure.
    paths = write_curves([tmp_path / "run"], tmp_path / "curves", title="tiny")
    row = json.loads(paths["json"].read_text())["runs"][0]
    assert row["teacher"] == history[-1]["teacher_top1"] and row["steps"] == 32
    assert row["untrained"] == history[0]["teacher_top1"]
    entropy = events.Scalars("signals/teacher_entropy")[-1].value
    ln_k = math.log(read_run(tmp_path / "run").args["out_dim"])
    assert row["end_entropy_over_lnK"] == pytest.approx(entropy / ln_k)
    assert row["end_prototypes_in_use"] == events.Scalars("signals/prototypes_in_use")[-1].value
    assert "| run |" in paths["table"].read_text()
    with Image.open(paths["figure"]) as image:
        assert image.size == (1200, 520)
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # drawn, not blank
    logged = [s.step for s in events.Scalars("signals/teacher_entropy")]
    assert [step for step, _ in read_run(tmp_path / "run").signals["signals/teacher_entropy"]] == (
        sorted(set(logged))
    )
    with Image.open(paths["signals"]) as image:
        assert image.size == (1500, 460)
        assert len(np.unique(np.asarray(image.convert("L")))) > 10


def test_a_run_with_an_extreme_teacher_temperature_prints_the_uniform_alarm(tmp_path):
    stdout, _ = run(
        tmp_path, subset=64, epochs=3, teacher_temp=100.0, warmup_teacher_temp=100.0, lr=0.5
    )
    assert "WARNING [uniform alarm] the teacher stays near uniform" in stdout
    assert "[collapse alarm]" not in stdout


def test_a_run_with_a_near_zero_teacher_temperature_prints_the_collapse_alarm(tmp_path):
    stdout, _ = run(
        tmp_path,
        subset=64,
        epochs=3,
        teacher_temp=1e-4,
        warmup_teacher_temp=1e-4,
        momentum_teacher=0.0,
    )
    assert "WARNING [collapse alarm] the teacher has collapsed onto" in stdout


def curve(name: str, seed: int, teacher: float, lr: float = 0.01) -> RunCurve:
    """A run's k-NN history as training stores it: untrained 50, then ``teacher``."""
    history = [
        {"epoch": e, "step": 10 * e, "train_time_s": 60.0 * e, "knn_time_s": 1.0,
         "teacher_top1": t, "student_top1": t - 1 if e else t}
        for e, t in ((0, 50.0), (1, teacher))
    ]  # fmt: skip
    return RunCurve(name, {"arch": "vit_t", "lr": lr, "seed": seed, "out_dim": 256}, history, 80.0)


def test_runs_that_differ_only_in_seed_are_pooled_with_their_spread():
    runs = [curve("a0", 0, 60.0), curve("b0", 0, 70.0, lr=0.003), curve("a1", 1, 64.0)]
    (group,) = seed_groups(runs)  # b0 has no second seed: left out
    assert group["runs"] == ["a0", "a1"] and group["seeds"] == [0, 1]
    gain = group["teacher_gain"]
    assert gain["values"] == [10.0, 14.0] and gain["mean"] == 12.0
    assert gain["std"] == pytest.approx(math.sqrt(8.0))
    assert group["student"]["mean"] == 61.0
    table = markdown_table(runs)
    assert "| a0, a1 | 0, 1 | 50.0 ± 0.0 (50.0, 50.0) | 62.0 ± 2.8 (60.0, 64.0) |" in table
    assert "b0" not in table.split("Across seeds")[1]
    assert "Across seeds" not in markdown_table(runs[:2])


def test_a_sweep_across_sessions_is_redrawn_from_its_json_plus_new_runs(tmp_path):
    """Early run folders gone, their knn_curves.json kept: the new comparison takes its runs
    as they were (rows, curves, signals), pools seeds across files and refuses a run met
    twice; a file written before signals were stored keeps each run's last values."""
    entropy = [(0, 5.0), (10, 2.0)]
    first = [curve("a0", 0, 60.0), curve("b0", 0, 70.0, lr=0.003)]
    for run in first:
        run.signals = {"signals/teacher_entropy": entropy, "signals/prototypes_in_use": [(10, 9.0)]}
    (tmp_path / "old.json").write_text(json.dumps(curves_data(first)))
    later = curves_data([curve("a1", 1, 64.0)])
    del later["runs"][0]["signals"]  # as the files of round 3 were written
    later["runs"][0]["end_entropy_over_lnK"] = 0.25
    later["runs"][0]["end_prototypes_in_use"] = 12.0
    (tmp_path / "later.json").write_text(json.dumps(later))

    paths = write_curves([tmp_path / "old.json", tmp_path / "later.json"], tmp_path / "all")
    data = json.loads(paths["json"].read_text())
    assert [row["run"] for row in data["runs"]] == ["a0", "b0", "a1"]
    assert data["runs"][0]["signals"]["signals/teacher_entropy"] == [[0, 5.0], [10, 2.0]]
    assert data["runs"][0]["end_entropy_over_lnK"] == pytest.approx(2.0 / math.log(256))
    assert data["runs"][2]["signals"] is None
    assert data["runs"][2]["end_entropy_over_lnK"] == pytest.approx(0.25)
    assert data["runs"][2]["end_prototypes_in_use"] == 12.0
    assert data["runs"][2]["history"] == curve("a1", 1, 64.0).history
    (group,) = data["seed_groups"]
    assert group["runs"] == ["a0", "a1"] and group["teacher_gain"]["values"] == [10.0, 14.0]
    assert paths["table"].read_text() == markdown_table(read_runs([paths["json"]])) + "\n"
    assert "signals" in paths  # drawn from the runs that kept theirs

    with pytest.raises(ValueError, match="'a0' comes from both .*old.json and .*all"):
        read_runs([tmp_path / "old.json", paths["json"]])
    (tmp_path / "bad.json").write_text('{"runs": [{"run": "x"}]}')
    with pytest.raises(ValueError, match="bad.json: not a knn_curves.json"):
        read_runs([tmp_path / "bad.json"])


@pytest.mark.parametrize("count", [3, 14, 45])
def test_every_run_of_a_figure_gets_its_own_colour_and_line_style(count):
    styles = run_styles(count)
    assert len({(style["color"], style["linestyle"]) for style in styles}) == count
    if count <= 10:
        assert all(style["linestyle"] == "-" for style in styles)
