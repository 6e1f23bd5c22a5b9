"""The study (launch/study.py) end to end on the local executor, as a user runs it.

One tiny study (vit_t and locatvit_t, one seed, one epoch of depth-1 backbones on 64
Fashion-MNIST images, every evaluator at its smallest) is interrupted once its first training
has finished, then started again: the second start must skip that training and finish the
rest, ending with results.json, the figure and the table.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dino_locat.checkpoint import checkpoint_args, load_checkpoint
from dino_locat.evaluation import knn
from dino_locat.evaluation.options import EvaluationInputError
from dino_locat.launching.study import METRICS, get_args_parser, plan_study, read_results, render
from dino_locat.launching.study.report import POWER_FACTOR, verdict

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("vit_t", "locatvit_t")
TRAIN_FLAGS = (
    "--depth 1 --epochs 1 --warmup_epochs 0 --subset 64 --batch_size_per_gpu 16 "
    "--global_crops_size 16 --local_crops_size 8 --knn_train_images 100 --knn_test_images 40 "
    "--num_workers 0 --print_freq 2"
).split()
EVAL_FLAGS = {
    "knn": "--train_subset 100 --test_subset 40 --nb_knn 10 20 --num_workers 0",
    "linear": "--train_subset 100 --test_subset 40 --epochs 1 --lrs 0.01 --n_last_blocks 1 "
    "--avgpool_patchtokens false --num_workers 0",
    "segmentation": "--train_scenes 8 --test_scenes 4 --epochs 1 --image_size 32 --num_workers 0",
    "hummingbird": "--train_scenes 8 --test_scenes 4 --input_size 32 --num_workers 0",
}
FIRST_RUN = "vit_t seed 0"


def study_argv(out: Path, cluster: str) -> list[str]:
    argv = [sys.executable, str(REPO / "launch" / "study.py"), "--output_dir", str(out)]
    argv += ["--archs", *ARCHS, "--seeds", "0", "--cluster", cluster, *TRAIN_FLAGS]
    for name, flags in EVAL_FLAGS.items():
        argv += ["--eval_args", f"{name}={flags}"]
    return argv


def fingerprint(path: Path) -> tuple[int, str]:
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """Start the study on the local executor, stop it (Ctrl-C) right after the first training
    finished, start it again; return both outputs and the first checkpoint's fingerprint."""
    out = tmp_path_factory.mktemp("study") / "study"
    first = subprocess.Popen(
        study_argv(out, "local"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        # Ctrl-C must reach it even when pytest itself runs with SIGINT ignored (a background
        # job of a non-interactive shell): Python only handles SIGINT that is not ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    for line in first.stdout:
        seen.append(line)
        if line.startswith(f"[study] {FIRST_RUN} finished in"):
            first.send_signal(signal.SIGINT)
            break
    rest, _ = first.communicate(timeout=120)
    interrupted = "".join(seen) + rest
    assert first.returncode == 130, interrupted[-3000:]
    checkpoint = out / "runs" / "vit_t_seed0" / "checkpoint.pth"
    before = fingerprint(checkpoint)
    # Started again in-process (debug): each of its 23 jobs would otherwise pay a Python
    # start-up with torch; what is skipped does not depend on the executor.
    second = subprocess.run(
        study_argv(out, "debug"), capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {
        "out": out,
        "interrupted": interrupted,
        "resumed": second.stdout,
        "checkpoint": checkpoint,
        "before": before,
    }


def test_interrupted_study_does_not_redo_a_finished_run(study):
    assert "[study] interrupted: rerun the same command" in study["interrupted"]
    assert f"[study] skipped {FIRST_RUN}: finished" in study["resumed"]
    assert f"[study] === {FIRST_RUN} " not in study["resumed"]
    assert fingerprint(study["checkpoint"]) == study["before"]
    # The evaluation that the interruption cut short runs again, and so does the rest.
    assert f"[study] === knn of {FIRST_RUN} " in study["resumed"]
    assert "[study] === locatvit_t seed 0 " in study["resumed"]


def test_study_writes_results_figure_and_table(study):
    out = study["out"]
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    networks = [(r["network"], r["arch"], r["evaluation"]) for r in records]
    evaluators = ("knn", "linear", "segmentation", "hummingbird")
    expected = [("raw_pixels", None, e) for e in evaluators]
    expected += [(n, a, e) for n in ("untrained", "trained") for a in ARCHS for e in evaluators]
    assert sorted(networks, key=str) == sorted(expected, key=str)
    assert results["failed"] == [] and results["code_version"]
    for record in records:
        assert record["code_version"] and record["evaluation_flags"]
        values = [v for v in record["metrics"].values()]
        assert len(values) == 1 and 0 <= values[0] <= 100, record
    # Identical settings apart from the backbone: the two trained runs' flags differ only there.
    trained = {r["arch"]: r["training_flags"] for r in records if r["network"] == "trained"}
    differ = {k for k in trained["vit_t"] if trained["vit_t"][k] != trained["locatvit_t"][k]}
    assert differ == {"arch", "output_dir"}
    assert trained["vit_t"]["depth"] == 1 and trained["vit_t"]["preset"] == "study"
    # The flags recorded are those the run used: the study preset asks for fp16, a CPU run
    # trains in fp32 and its checkpoint says so.
    used = checkpoint_args(load_checkpoint(out / "runs" / "vit_t_seed0" / "checkpoint.pth"))
    assert trained["vit_t"]["use_fp16"] is False and used["use_fp16"] is False
    assert trained["vit_t"] == {**used, "output_dir": "runs/vit_t_seed0"}
    # The table: one row per metric, each arch's mean with its number of seeds, the difference.
    rows = {row["metric"]: row for row in results["summary"]}
    assert set(rows) == set(METRICS)
    for row in rows.values():
        entry = row["archs"]["locatvit_t"]
        assert entry["seeds"] == 1 and entry["std"] is None
        assert entry["difference"] == pytest.approx(entry["mean"] - row["archs"]["vit_t"]["mean"])
        assert entry["verdict"] == "no spread (one seed)"
        assert row["archs"]["vit_t"]["untrained"] is not None
    assert all(row["raw_pixels"] is not None for row in rows.values())
    table = (out / "table.md").read_text().strip().splitlines()
    assert table[0].startswith("| metric | vit_t mean ± std (n) | locatvit_t mean ± std (n)")
    assert table[0].endswith("| locatvit_t − vit_t |") and len(table) == 2 + len(METRICS)
    assert "\n".join(table) in study["resumed"]
    for line, (_, _, label) in zip(table[2:], METRICS.values(), strict=True):
        assert line.startswith(f"| {label} |") and line.endswith("(no spread (one seed)) |")
    with Image.open(out / "study.png") as figure:
        assert figure.format == "PNG" and figure.width >= 1000
    # Every piece ran as a submitit job in its own folder.
    for record in records:
        folder = (out / record["results_file"]).parent
        assert list((folder / "jobs").iterdir()), folder


def test_moved_study_folder_is_read_and_rerun_where_it_lies(study, tmp_path):
    """results.json names its files relative to the study folder: once the folder is moved,
    they are found in the new place, and the same command on it finds every piece finished
    and writes the report there."""
    out = study["out"]
    moved = tmp_path / "moved_study"
    out.rename(moved)
    try:
        results = read_results(moved / "results.json")
        recorded = {k: v for k, v in results.data.items() if k != "command"}  # argv as typed
        assert str(out) not in json.dumps(recorded) and results.data["figure"] == "study.png"
        for record in results.data["records"]:
            evaluated = json.loads(results.locate(record["results_file"]).read_text())
            assert evaluated["evaluation"] == record["evaluation"]
            if record["training_flags"] is not None:
                run_folder = results.locate(record["training_flags"]["output_dir"])
                assert (run_folder / "checkpoint.pth").is_file()
        assert [(a, s) for a, s, _ in results.runs()] == [("vit_t", 0), ("locatvit_t", 0)]
        assert all((folder / "checkpoint.pth").is_file() for _, _, folder in results.runs())
        rerun = subprocess.run(
            study_argv(moved, "debug"), capture_output=True, text=True, cwd=REPO, timeout=600
        )
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        planned, finished = re.search(r"\[study\] (\d+) pieces, (\d+) already finished",
                                      rerun.stdout).groups()  # fmt: skip
        assert planned == finished == "24"
        again = read_results(moved / "results.json")
        assert again.data["records"] == results.data["records"]
    finally:
        moved.rename(out)


def test_results_of_an_older_study_are_still_read(tmp_path):
    """Before paths were relative, results.json recorded absolute ones (this file: the
    default study of docs/study, run in another folder): the table and figure are drawn again
    from it, and its paths are taken relative to the folder it lies in now."""
    old = json.loads((REPO / "tests" / "data" / "study_results_absolute_paths.json").read_text())
    assert old["figure"] == "/work/main/output/study/study.png"
    (tmp_path / "results.json").write_text(json.dumps(old))
    results = read_results(tmp_path / "results.json")
    table, figure = render(results)
    assert "| k-NN 20-NN top-1 (%) | 59.15 ± 2.62 (2) | 65.32 ± 0.67 (2) | 63.80 | 63.15 | " \
           "81.50 | +6.17 (better) |" in table.splitlines()  # fmt: skip
    assert (tmp_path / "table.md").read_text() == table + "\n"
    with Image.open(figure) as image:
        assert figure == tmp_path / "study.png" and image.format == "PNG"
    first = results.data["records"][0]["results_file"]
    assert first == "/work/main/output/study/runs/vit_t_seed0/eval_knn/results.json"
    assert results.locate(first) == tmp_path / "runs" / "vit_t_seed0" / "eval_knn" / "results.json"
    assert results.locate("/elsewhere/data") == Path("/elsewhere/data")
    assert [folder for _, _, folder in results.runs()][:2] == [
        tmp_path / "runs" / "vit_t_seed0", tmp_path / "runs" / "locatvit_t_seed0",
    ]  # fmt: skip


def test_plan_is_identical_but_for_the_backbone_and_sized_by_the_budget(tmp_path):
    args = get_args_parser().parse_args(["--output_dir", str(tmp_path)])
    pieces = plan_study(args)
    trains = [p for p in pieces if p.kind == "train"]
    assert [(p.arch, p.seed) for p in trains] == [
        ("vit_t", 0), ("locatvit_t", 0), ("vit_t", 1), ("locatvit_t", 1),
    ]  # fmt: skip
    assert all(p.args.preset == "study" and p.args.depth is None for p in trains)
    assert all(p.args.use_fp16 for p in trains)  # asked for; what ran is recorded (fp32 on CPU)
    assert sum(1 for p in pieces if p.kind == "eval") == 4 + 6 * 4  # 4 of them on raw pixels
    raw = {p.evaluator: p.args for p in pieces if p.label.endswith("on raw pixels")}
    assert all(a.raw_pixels and a.pretrained_weights is None for a in raw.values())
    assert (raw["knn"].image_size, raw["linear"].image_size) == (32, 32)  # the whole image
    assert raw["segmentation"].patch_size == raw["hummingbird"].patch_size == 8  # the token grid
    total_min = sum(p.estimate_s for p in pieces) / 60
    assert {(p.args.subset, p.args.epochs, p.args.warmup_epochs) for p in trains} == {
        (28500, 4, 0.4)
    }  # 114,000 image views per run, where DINO learns (round 3 of the sweep)
    assert 120 <= total_min <= 180, total_min  # quiet-machine ETA, training about 2 h of it
    small = plan_study(get_args_parser().parse_args(["--output_dir", str(tmp_path), "--budget",
                                                     "small"]))  # fmt: skip
    assert sum(p.estimate_s for p in small) < 0.7 * total_min * 60
    assert {p.args.depth for p in small if p.kind == "train"} == {6}
    large = get_args_parser().parse_args(["--output_dir", str(tmp_path), "--budget", "large"])
    large_trains = [p for p in plan_study(large) if p.kind == "train"]
    assert len(large_trains) == 6 and {p.args.patch_size for p in large_trains} == {4}
    # A flag the user passes wins over the budget.
    mine = get_args_parser().parse_args(["--output_dir", str(tmp_path), "--budget", "small",
                                         "--depth", "3", "--seeds", "5"])  # fmt: skip
    assert {(p.args.depth, p.seed) for p in plan_study(mine) if p.kind == "train"} == {(3, 5)}


def test_long_budget_trains_the_long_preset_once(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--budget", "long", "--archs", "locatvit_t"]
    pieces = plan_study(get_args_parser().parse_args(argv))
    (train,) = [p for p in pieces if p.kind == "train"]
    assert (train.arch, train.seed, train.args.preset) == ("locatvit_t", 0, "long")
    assert (train.args.subset, train.args.epochs, train.args.knn_train_images) == (0, 7, 10000)
    assert {p.kind for p in pieces} == {"train", "untrained", "eval"}
    assert 110 <= sum(p.estimate_s for p in pieces) / 60 <= 150


@pytest.mark.parametrize(
    ("first", "other", "expected"),
    [
        ([60.0, 61.0], [70.0, 71.0], ("better", None)),  # separated, gap 10 > 2 x 0.71
        ([70.0, 71.0], [60.0, 61.0], ("worse", None)),
        # separated, but the gap (4) is under twice the spread (2 x 2.12): a tie
        ([60.0, 63.0], [64.0, 67.0], ("tie", math.ceil(2 * POWER_FACTOR * 4.5 / 16))),
        # gap (7.15) over twice the spread (2 x 1.58), but seeds overlap (5 > 4.5): a tie,
        # and more seeds than the ten we have would be needed
        ([0.0] * 9 + [5.0], [4.5] + [8.0] * 9, ("tie", 11)),
        ([60.0], [70.0], ("no spread (one seed)", None)),
    ],
)
def test_verdict_calls_a_difference_only_when_the_seeds_separate_clearly(first, other, expected):
    assert verdict(first, other) == expected


def test_rerun_with_other_training_flags_is_refused(study):
    argv = ["--output_dir", str(study["out"]), "--seeds", "0", *TRAIN_FLAGS, "--lr", "0.5"]
    first = next(p for p in plan_study(get_args_parser().parse_args(argv)) if p.kind == "train")
    with pytest.raises(ValueError, match="holds a run with other flags: --lr 0.01"):
        first.done()


def test_user_data_path_uses_dino_defaults(tmp_path):
    data = tmp_path / "data" / "train"
    (data / "a").mkdir(parents=True)
    args = get_args_parser().parse_args(["--output_dir", str(tmp_path), "--data_path", str(data)])
    trains = [p for p in plan_study(args) if p.kind == "train"]
    assert all(p.args.preset == "main" and p.args.epochs == 100 for p in trains)
    assert all(p.estimate_s is None for p in trains)
    assert os.fspath(trains[0].args.data_path) == str(data.resolve())


def test_raw_pixel_knn_takes_no_backbone_and_needs_a_size(tmp_path):
    parser = knn.get_args_parser()
    both = parser.parse_args(["--raw_pixels", "--image_size", "16", "--pretrained_weights", "x"])
    with pytest.raises(EvaluationInputError, match="--pretrained_weights and --raw_pixels"):
        knn.run_knn(both)
    with pytest.raises(EvaluationInputError, match="--raw_pixels needs --image_size"):
        knn.run_knn(parser.parse_args(["--raw_pixels"]))


def test_an_evaluation_stays_finished_when_its_evaluator_gains_a_flag(tmp_path):
    """A study finished before an evaluator gained a flag is not redone for it, as long as
    the flag is planned at its default; a flag planned otherwise makes the piece stale."""
    args = get_args_parser().parse_args(["--output_dir", str(tmp_path), "--budget", "small"])
    piece = next(p for p in plan_study(args) if p.label == "linear on raw pixels")
    piece.folder.mkdir(parents=True)
    (piece.folder / "results.json").write_text("{}")
    flags = piece.recorded_flags()
    assert flags["compile"] is False and flags["raw_pixels"] is True
    piece.record_path.write_text(json.dumps({"flags": flags}))
    assert piece.done()
    older = {k: v for k, v in flags.items() if k != "compile"}  # --compile at its default
    piece.record_path.write_text(json.dumps({"flags": older}))
    assert piece.done()
    older = {k: v for k, v in flags.items() if k != "raw_pixels"}  # not at its default
    piece.record_path.write_text(json.dumps({"flags": older}))
    assert not piece.done()
    piece.record_path.write_text(json.dumps({"flags": {**flags, "lrs": [0.5]}}))
    assert not piece.done()


@pytest.fixture(scope="module")
def second_part(study, tmp_path_factory) -> Path:
    """The same study's seed 1, k-NN only, run apart (in-process) in another folder."""
    out = tmp_path_factory.mktemp("part") / "seed1"
    argv = [sys.executable, str(REPO / "launch" / "study.py"), "--output_dir", str(out)]
    argv += ["--archs", *ARCHS, "--seeds", "1", "--cluster", "debug", *TRAIN_FLAGS]
    argv += ["--eval", "knn", "--eval_args", f"knn={EVAL_FLAGS['knn']}"]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out / "results.json"


def combine(files: list[Path], out: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(REPO / "launch" / "study.py"), "--output_dir", str(out)]
    argv += ["--combine", *map(str, files)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300)


def knn_by_seed(results: dict, network: str, arch: str) -> dict[int, float]:
    return {
        r["seed"]: r["metrics"]["knn_top1"]
        for r in results["records"]
        if (r["network"], r["arch"], r["evaluation"]) == (network, arch, "knn")
    }


def test_parts_of_a_study_run_apart_combine_into_one_report(study, second_part, tmp_path):
    """Seed 0 here, seed 1 there: one results.json, table and figure with both seeds, the
    baselines both parts measured kept once, and every run's curves inside results.json, so
    the figure is drawn again once the run folders are gone."""
    combined = combine([study["out"] / "results.json", second_part], tmp_path / "both")
    assert combined.returncode == 0, combined.stdout[-3000:] + combined.stderr[-3000:]
    results = json.loads((tmp_path / "both" / "results.json").read_text())
    assert [p["results"] for p in results["combined_from"]] == [
        str(study["out"] / "results.json"), str(second_part),
    ]  # fmt: skip
    keys = [(r["network"], r["arch"], r["seed"], r["evaluation"]) for r in results["records"]]
    assert len(keys) == len(set(keys))
    assert keys.count(("raw_pixels", None, None, "knn")) == 1  # measured in both, kept once
    knn_row = next(row for row in results["summary"] if row["metric"] == "knn_top1")
    for arch in ARCHS:
        entry = knn_row["archs"][arch]
        assert entry["seeds"] == 2 and entry["std"] is not None
        assert len(entry["untrained_values"]) == 2  # each part's untrained network
        assert entry["untrained"] == pytest.approx(sum(entry["untrained_values"]) / 2)
        trained, untrained = (
            knn_by_seed(results, "trained", arch),
            knn_by_seed(results, "untrained", arch),
        )
        assert entry["gain_over_own_untrained"] == {
            str(s): pytest.approx(trained[s] - untrained[s]) for s in (0, 1)
        }  # fmt: skip
    assert knn_row["archs"]["locatvit_t"]["verdict"] != "no spread (one seed)"
    linear_row = next(row for row in results["summary"] if row["metric"] == "linear_top1")
    assert linear_row["archs"]["vit_t"]["seeds"] == 1  # seed 1 ran k-NN only
    table = (tmp_path / "both" / "table.md").read_text()
    assert table.strip() in combined.stdout and "(2) |" in table
    # Records point at the parts' files where they lie.
    for record in results["records"]:
        assert Path(record["results_file"]).is_file(), record["results_file"]
    # The figure is drawn from results.json alone: no run folder beside this copy.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "results.json").write_text(json.dumps(results))
    curves = read_results(alone / "results.json").curves()
    assert sorted(name for _, name, _ in curves) == sorted(
        f"{a} seed {s}" for a in ARCHS for s in (0, 1)
    )
    assert all(curve is not None and curve.epochs == [0, 1] for curve, _, _ in curves)
    with_gaug = {name for _, name, gaug in curves if gaug is not None}
    assert with_gaug == {"locatvit_t seed 0", "locatvit_t seed 1"}  # ViT has no GAug
    render(read_results(alone / "results.json"))
    with Image.open(alone / "study.png") as figure:
        assert figure.format == "PNG"


def test_parts_that_are_not_one_study_are_refused(study, second_part, tmp_path):
    """A part trained with another flag, or one that reads another value for a network both
    parts evaluated, is refused with the flag named, and nothing is written."""
    part = json.loads(second_part.read_text())
    for record in part["records"]:
        if record["training_flags"] is not None:
            record["training_flags"]["lr"] = 0.5
    other_lr = tmp_path / "other_lr" / "results.json"
    other_lr.parent.mkdir()
    other_lr.write_text(json.dumps(part))
    refused = combine([study["out"] / "results.json", other_lr], tmp_path / "out")
    assert refused.returncode == 2 and "training flag lr=0.5" in refused.stderr
    assert "not one study" in refused.stderr and not (tmp_path / "out").exists()
    part = json.loads(second_part.read_text())
    raw = next(r for r in part["records"] if r["network"] == "raw_pixels")
    raw["metrics"]["knn_top1"] += 1.0
    other_value = tmp_path / "other_value" / "results.json"
    other_value.parent.mkdir()
    other_value.write_text(json.dumps(part))
    refused = combine([study["out"] / "results.json", other_value], tmp_path / "out")
    assert refused.returncode == 2 and "both evaluated ('raw_pixels'" in refused.stderr
    missing = combine([study["out"] / "results.json", tmp_path / "nope.json"], tmp_path / "out")
    assert missing.returncode == 2 and "nope.json does not exist" in missing.stderr


def test_report_only_writes_the_report_of_what_finished_and_runs_nothing(study, tmp_path):
    """A study stopped early: --report_only reports its finished pieces, names the rest, and
    submits no job."""
    copy = tmp_path / "stopped"
    shutil.copytree(study["out"], copy)
    (copy / "results.json").unlink()
    cut = copy / "runs" / "locatvit_t_seed0" / "eval_linear"
    (cut / "results.json").unlink()
    jobs_before = sorted(p for p in copy.rglob("jobs/*"))
    argv = study_argv(copy, "local") + ["--report_only"]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((copy / "results.json").read_text())
    assert results["failed"] == ["linear of locatvit_t seed 0"]
    assert "failed or not run: linear of locatvit_t seed 0" in run.stderr
    evaluated = {(r["network"], r["arch"], r["evaluation"]) for r in results["records"]}
    assert ("trained", "locatvit_t", "linear") not in evaluated
    assert ("trained", "locatvit_t", "knn") in evaluated and len(evaluated) == 4 + 16 - 1
    assert sorted(p for p in copy.rglob("jobs/*")) == jobs_before  # nothing was submitted
    table = (copy / "table.md").read_text().splitlines()
    linear = next(line for line in table if line.startswith("| linear"))
    assert "| - ± - (0) |" in linear and linear.endswith("| - |")  # no locatvit_t value
    assert (copy / "study.png").is_file()


def test_baselines_only_plans_the_untrained_networks_and_raw_pixels(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--seeds", "1", "--baselines_only"]
    pieces = plan_study(get_args_parser().parse_args(argv))
    assert {p.kind for p in pieces} == {"untrained", "eval"}
    untrained = [(p.arch, p.seed) for p in pieces if p.kind == "untrained"]
    assert untrained == [("vit_t", 1), ("locatvit_t", 1)]
    assert len(pieces) == 2 + 2 * 4 + 4  # each untrained network's four evaluations, raw pixels
