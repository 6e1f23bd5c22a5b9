"""Does locality help under DINO? The backbone comparison as one command (DESIGN §8).

A grid of DINO pretrainings that differ only in the backbone and the seed (same steps, data
order, augmentations, head and schedules), every final teacher evaluated with k-NN, the
linear probe, frozen segmentation and Hummingbird, plus the baselines that give the numbers
meaning: the untrained network of each arch and raw pixels for k-NN. Every training and
evaluation is one submitit job in its own folder (SLURM: evaluations wait for their training
with afterok; local: one job after another). A piece whose outputs exist is skipped, an
interrupted training resumes from its checkpoint. The study ends by writing results.json,
a figure and a table (mean and spread over seeds per arch, and the difference to the first
arch; a difference within the spread is a tie).

Layout of ``--output_dir``::

    runs/<arch>_seed<N>/        training output (checkpoint.pth, log.txt, TensorBoard)
        eval_<name>/            one evaluation (results.json, study_piece.json, jobs/)
    untrained/<arch>/           the untrained network (checkpoint.pth) and its evaluations
    raw_pixels/eval_knn/        k-NN on raw pixels
    results.json  study.png  table.md
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from dino_locat.checkpoint import RESUME_HINT, checkpoint_args, load_checkpoint, plain_args
from dino_locat.evaluation.report import write_json_atomic
from dino_locat.files import atomic_write
from dino_locat.launching.executors import fresh_job_folder
from dino_locat.launching.follow import QUEUED_STATES, follow
from dino_locat.launching.jobs import ResumableJob
from dino_locat.launching.options import (
    add_submission_args,
    check_submission_args,
    resolve_cluster,
)
from dino_locat.launching.submission import (
    EVALUATORS,
    _eval_resources,
    _submit,
    add_eval_flags,
)
from dino_locat.training import get_args_parser as training_args_parser
from dino_locat.training import main as train_main
from dino_locat.training.args import resolve_args
from dino_locat.training.loop import save_untrained
from dino_locat.visualization.study import MetricPanel, OnlineCurve, study_figure
from dino_locat.visualization.trends import trends_from_tensorboard

DEFAULT_ARCHS = ("vit_t", "locatvit_t")
# Study flags that replace training flags of the same name.
OWN_FLAGS = {"help", "arch", "seed", "output_dir", "preset"}
# Training flags that may differ between a finished run and a rerun of the study (use_fp16:
# training turns it off on CPU, so the stored value follows the device).
RUN_ONLY_FLAGS = {
    "output_dir",
    "num_workers",
    "print_freq",
    "compile",
    "preset",
    "use_fp16",
}

# what an evaluation's parent piece makes of the network it evaluates
NETWORKS = {"train": "trained", "untrained": "untrained"}
# metric -> (evaluator, keys into its results.json, label)
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "knn_top1": ("knn", ("knn", "20", "top1"), "k-NN 20-NN top-1 (%)"),
    "linear_top1": ("linear", ("headline", "test_top1"), "linear top-1 (%), held-out selection"),
    "segmentation_miou": ("segmentation", ("mIoU",), "frozen segmentation mIoU (%)"),
    "hummingbird_miou": ("hummingbird", ("mIoU",), "Hummingbird mIoU (%)"),
}


@dataclass(frozen=True)
class Budget:
    """How big the study on the embedded data is: seeds, training flags (filled where the
    user gave none) and evaluator flags (placed before the user's ``--eval_args``), and the
    seconds each piece took on the 2-core reference machine (for the ETA).

    With ``--data_path`` only ``seeds`` apply: training uses DINO's defaults and the
    evaluators their own, plus whatever flags are passed.
    """

    seeds: tuple[int, ...]
    train: dict[str, Any]
    evals: dict[str, list[str]]
    seconds: dict[str, float]


# The one place that sizes the study. Seconds per piece on a quiet 2-core CPU machine:
# evaluators from `python tests/benchmarks/bench_study_pieces.py --fraction 0.1` (CPU seconds
# on a tenth of each set, extrapolated linearly; the full k-NN piece measured 88.5 CPU s
# against 84 extrapolated; quiet wall ~0.85 x CPU, as torch keeps barely one core busy on
# these small models), a Python start-up of ~8 s per job included; training from the preset's
# 4-6 minutes per run. `default` adds up to about 51 minutes (2 archs x 2 seeds, 25
# evaluations), so a machine loaded up to twice over still finishes within 2 hours.
_SMALL_LINEAR = ["--epochs", "10", "--lrs", "0.001", "0.01", "0.1"]
BUDGETS: dict[str, Budget] = {
    "small": Budget(
        seeds=(0, 1),
        train={"epochs": 2, "depth": 6},
        evals={
            "knn": ["--train_subset", "2000", "--test_subset", "500", "--num_workers", "1"],
            "linear": ["--train_subset", "2000", "--test_subset", "500", *_SMALL_LINEAR,
                       "--num_workers", "1"],
            "segmentation": ["--protocol", "fast", "--train_scenes", "200", "--test_scenes",
                             "50", "--epochs", "10", "--num_workers", "1"],
            "hummingbird": ["--train_scenes", "200", "--test_scenes", "50", "--num_workers",
                            "1"],
        },
        seconds={"train": 85, "untrained": 15, "knn": 15, "raw_pixels": 15, "linear": 16,
                 "segmentation": 15, "hummingbird": 11},
    ),
    "default": Budget(
        seeds=(0, 1),
        train={},
        evals={
            "knn": ["--train_subset", "10000", "--test_subset", "2000", "--num_workers", "1"],
            "linear": ["--train_subset", "10000", "--test_subset", "2000", "--num_workers",
                       "1"],
            "segmentation": ["--protocol", "fast", "--train_scenes", "1000", "--test_scenes",
                             "250", "--num_workers", "1"],
            "hummingbird": ["--train_scenes", "1000", "--test_scenes", "250", "--num_workers",
                            "1"],
        },
        seconds={"train": 330, "untrained": 15, "knn": 80, "raw_pixels": 15, "linear": 90,
                 "segmentation": 75, "hummingbird": 40},
    ),
    "large": Budget(
        seeds=(0, 1, 2),
        train={"epochs": 12, "depth": 12, "patch_size": 4},
        evals={
            "knn": ["--train_subset", "0", "--test_subset", "0"],
            "linear": ["--train_subset", "0", "--test_subset", "0"],
            "segmentation": ["--protocol", "fast", "--train_scenes", "4000", "--test_scenes",
                             "1000"],
            "hummingbird": ["--train_scenes", "4000", "--test_scenes", "1000"],
        },
        # default's seconds x 4 (patch 4: 4x the tokens) x the data (and epochs) ratios
        seconds={"train": 330 * 4 * 3, "untrained": 15, "knn": 80 * 4 * 6,
                 "raw_pixels": 15 * 6, "linear": 90 * 4 * 6, "segmentation": 75 * 4 * 4,
                 "hummingbird": 40 * 4 * 4},
    ),
}  # fmt: skip


@dataclass
class Piece:
    """One job of the study: a training, an untrained network, or one evaluation."""

    kind: str  # train | untrained | eval
    label: str
    folder: Path  # the outputs: a run folder, or an evaluation's eval_<name> folder
    entry: Callable[[argparse.Namespace], Any]
    args: argparse.Namespace
    estimate_s: float | None
    workers: int
    arch: str | None = None
    seed: int | None = None
    evaluator: str | None = None
    parent: Piece | None = None
    job: submitit.Job[Any] | None = field(default=None, repr=False)

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint.pth"

    @property
    def record_path(self) -> Path:
        return self.folder / "study_piece.json"

    def flags(self) -> dict[str, Any]:
        return plain_args(self.args)

    def done(self) -> bool:
        """Finished with the flags planned now (a training with other flags is an error)."""
        if self.kind == "eval":
            results = self.folder / "results.json"
            if not results.is_file() or not self.record_path.is_file():
                return False
            recorded = json.loads(self.record_path.read_text())
            parent = self.parent.checkpoint if self.parent else None
            newer = parent is None or (
                parent.is_file() and results.stat().st_mtime >= parent.stat().st_mtime
            )
            return recorded.get("flags") == self.flags() and newer
        if not self.checkpoint.exists():
            return False
        ckpt = load_checkpoint(self.checkpoint, hint=RESUME_HINT)
        stored, planned = checkpoint_args(ckpt), self.flags()
        differ = sorted(
            k for k in planned if k not in RUN_ONLY_FLAGS and stored.get(k) != planned[k]
        )
        if differ:
            shown = ", ".join(f"--{k} {stored.get(k)!r} (now {planned[k]!r})" for k in differ)
            raise ValueError(
                f"{self.folder} holds a run with other flags: {shown}; pass the same flags or "
                "another --output_dir"
            )
        return self.kind == "untrained" or int(ckpt.get("epoch", 0)) >= self.args.epochs


def get_args_parser() -> argparse.ArgumentParser:
    """The study's own flags, every DINO training flag (passed to each run) and submission."""
    parser = argparse.ArgumentParser(
        "launch/study.py",
        description="Does locality help under DINO? DINO-pretrain each --archs x --seeds with "
        "identical settings, evaluate every final teacher (k-NN, linear, segmentation, "
        "Hummingbird) and the baselines (untrained network, raw pixels), then write "
        "results.json, a figure and a table. Rerunning skips finished pieces.",
    )
    study = parser.add_argument_group("study")
    study.add_argument(
        "--archs",
        nargs="+",
        default=list(DEFAULT_ARCHS),
        help="backbones to compare; the differences are to the first (default: vit_t locatvit_t)",
    )
    study.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="pretraining seeds (default: budget's)"
    )
    study.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        default="default",
        help="size on the embedded data: small (~12 min on a quiet 2-core CPU), default "
        "(~51 min quiet, within 2 h on a busy one), large (12 epochs, depth 12, patch 4, 3 "
        "seeds, full evaluation sets: for a GPU or a long night); flags you pass win "
        "(default: %(default)s)",
    )
    study.add_argument("--output_dir", default="output/study", help="(default: %(default)s)")
    add_eval_flags(study, default=list(EVALUATORS))
    study.add_argument(
        "--no_untrained", action="store_true", help="skip the untrained-network baselines"
    )
    training = parser.add_argument_group(
        "training (every run; DINO's flags, see python -m dino_locat.training --help)"
    )
    for action in training_args_parser(add_help=False)._actions:
        if action.dest not in OWN_FLAGS:
            training._add_action(action)
    add_submission_args(parser)
    return parser


def training_dests() -> set[str]:
    return {a.dest for a in training_args_parser(add_help=False)._actions} - {"help"}


def code_version() -> str:
    """The git commit of the dino_locat sources (``+dirty`` with local changes), if any."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")


def _eval_flags(args: argparse.Namespace, budget: Budget) -> dict[str, list[str]]:
    flags = {name: [] if args.data_path else list(budget.evals[name]) for name in args.eval}
    for item in args.eval_args:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in args.eval:
            raise ValueError(
                f"--eval_args {item!r}: expected NAME=FLAGS with NAME in {','.join(args.eval)}"
            )
        flags[name].extend(shlex.split(text))
    return flags


def _work(args: argparse.Namespace) -> float:
    """Backbone work per image relative to the study preset (depth 12, 4x4 tokens)."""
    depth = args.depth or 12
    return depth / 12 * (args.global_crops_size // args.patch_size) ** 2 / 16


def plan_study(args: argparse.Namespace) -> list[Piece]:
    """Every piece of the study, in the order they run, with flags checked up front."""
    budget = BUDGETS[args.budget]
    seeds = args.seeds if args.seeds is not None else list(budget.seeds)
    if len(set(seeds)) != len(seeds) or len(set(args.archs)) != len(args.archs):
        raise ValueError("--archs and --seeds must not repeat a value")
    out = Path(args.output_dir).resolve()
    base = {k: v for k, v in vars(args).items() if k in training_dests()}
    if base["data_path"]:
        base["data_path"] = str(Path(base["data_path"]).resolve())
    else:
        for name, value in budget.train.items():
            if base.get(name) is None:
                base[name] = value
    eval_flags = _eval_flags(args, budget)
    preset = "main" if args.data_path else "study"

    def train_args(arch: str, seed: int, folder: Path) -> argparse.Namespace:
        flags = {**base, "arch": arch, "seed": seed, "output_dir": str(folder)}
        return resolve_args(argparse.Namespace(**flags, preset=preset))[0]

    reference = train_args(args.archs[0], seeds[0], out)
    measured = _budget_run(args.archs[0], budget)
    scale = _work(reference) / _work(measured)
    train_scale = scale * _images_seen(reference) / _images_seen(measured)

    def seconds(key: str, factor: float) -> float | None:
        return None if args.data_path else budget.seconds[key] * factor

    def evaluations(run: Piece) -> list[Piece]:
        pieces = []
        for name in args.eval:
            parser = EVALUATORS[name][0]()
            parser.prog = f"--eval_args {name}="
            folder = run.folder / f"eval_{name}"
            flags = ["--pretrained_weights", str(run.checkpoint), *eval_flags[name]]
            eval_args = parser.parse_args([*flags, "--output_dir", str(folder)])
            pieces.append(
                Piece(
                    "eval",
                    f"{name} of {run.label}",
                    folder,
                    EVALUATORS[name][1],
                    eval_args,
                    seconds(name, scale),
                    eval_args.num_workers,
                    run.arch,
                    run.seed,
                    name,
                    run,
                )
            )
        return pieces

    # Trained runs first (seed by seed, so a partial study already pairs the archs), then
    # the baselines.
    pieces: list[Piece] = []
    for seed in seeds:
        for arch in args.archs:
            folder = out / "runs" / f"{arch}_seed{seed}"
            run_args = train_args(arch, seed, folder)
            run = Piece(
                "train",
                f"{arch} seed {seed}",
                folder,
                train_main,
                run_args,
                seconds("train", train_scale),
                run_args.num_workers,
                arch,
                seed,
            )
            pieces += [run, *evaluations(run)]
    if not args.no_untrained:
        for arch in args.archs:
            folder = out / "untrained" / arch
            untrained = Piece(
                "untrained",
                f"{arch} untrained (seed {seeds[0]})",
                folder,
                save_untrained,
                train_args(arch, seeds[0], folder),
                seconds("untrained", 1.0),
                0,
                arch,
                seeds[0],
            )
            pieces += [untrained, *evaluations(untrained)]
    if "knn" in args.eval:
        parser = EVALUATORS["knn"][0]()
        folder = out / "raw_pixels" / "eval_knn"
        size = str(reference.global_crops_size)
        flags = ["--raw_pixels", "--image_size", size, *eval_flags["knn"]]
        knn_args = parser.parse_args([*flags, "--output_dir", str(folder)])
        pieces.append(
            Piece(
                "eval",
                "k-NN on raw pixels",
                folder,
                EVALUATORS["knn"][1],
                knn_args,
                seconds("raw_pixels", 1.0),
                knn_args.num_workers,
                evaluator="knn",
            )
        )
    return pieces


def _budget_run(arch: str, budget: Budget) -> argparse.Namespace:
    """The training the budget's seconds were measured on: the study preset + its flags."""
    parser = training_args_parser(add_help=False)
    flags = [f"--{k}={v}" for k, v in budget.train.items()]
    return resolve_args(parser.parse_args(["--arch", arch, "--preset", "study", *flags]))[0]


def _images_seen(args: argparse.Namespace) -> float:
    return float(args.epochs * (args.subset or 1))


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def print_plan(pieces: list[Piece], done: dict[int, bool]) -> None:
    """What will run, what is already finished, and the ETA from the per-piece estimates."""
    todo = [p for p in pieces if not done[id(p)]]
    print(f"[study] {len(pieces)} pieces, {len(pieces) - len(todo)} already finished", flush=True)
    for piece in pieces:
        state = "finished, skipped" if done[id(piece)] else f"~{_minutes(piece.estimate_s)}"
        print(f"[study]   {piece.label:<46} {state}", flush=True)
    estimates = [p.estimate_s for p in todo]
    if any(e is None for e in estimates):
        print("[study] ETA: unknown (no per-piece costs for --data_path)", flush=True)
    else:
        total = sum(e for e in estimates if e is not None)
        print(
            f"[study] ETA: about {_minutes(total)}, one job after another on a quiet 2-core CPU "
            "(per-piece costs: BUDGETS in dino_locat/launching/study.py; longer on a busy "
            "machine, shorter on a GPU)",
            flush=True,
        )


def _job_args(args: argparse.Namespace, piece: Piece) -> argparse.Namespace:
    """Submission flags for a piece: its own job folder; evaluations on one process."""
    job_args = argparse.Namespace(**{**vars(args), "output_dir": str(piece.folder)})
    return _eval_resources(job_args) if piece.kind == "eval" else job_args


def _reattach(piece: Piece) -> submitit.Job[Any] | None:
    """The SLURM job a detached earlier study submitted for this piece, if still queued."""
    if not piece.record_path.is_file():
        return None
    record = json.loads(piece.record_path.read_text())
    if record.get("cluster") != "slurm" or record.get("flags") != piece.flags():
        return None
    state = subprocess.run(
        ["squeue", "-h", "-j", str(record["job_id"]), "-o", "%T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.strip()
    if state not in QUEUED_STATES:
        return None
    print(f"[study] {piece.label}: attaching to job {record['job_id']} ({state})", flush=True)
    return submitit.SlurmJob(folder=record["job_folder"], job_id=str(record["job_id"]))


def submit_piece(args: argparse.Namespace, piece: Piece, cluster: str) -> submitit.Job[Any]:
    """Submit one piece (on SLURM after its training, with afterok) and record it."""
    job = _reattach(piece) if cluster == "slurm" else None
    if job is not None:
        return job
    job_args = _job_args(args, piece)
    folder = fresh_job_folder(job_args, piece.kind if piece.kind != "eval" else piece.evaluator)
    parent_job = piece.parent.job if piece.parent else None
    dependency = f"afterok:{parent_job.job_id}" if cluster == "slurm" and parent_job else None
    resume = piece.checkpoint if piece.kind == "train" else None
    name = f"study_{piece.label.replace(' ', '_')}"
    job = _submit(
        job_args,
        folder,
        name,
        # a copy: a job run in this process (debug) must not change the flags it is judged by
        ResumableJob(piece.entry, copy.deepcopy(piece.args), resume),
        piece.workers,
        dependency,
    )
    record = {
        "label": piece.label,
        "flags": piece.flags(),
        "code_version": code_version(),
        "cluster": cluster,
        "job_id": job.job_id,
        "job_folder": str(folder),
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(piece.record_path, record)
    return job


def run_pieces(args: argparse.Namespace, pieces: list[Piece], cluster: str) -> list[str] | None:
    """Run what is not finished; return the labels of pieces that failed or could not run
    (None: submitted to SLURM without ``--wait``, nothing to report yet).

    Local/debug: one job after another, an evaluation only after its training succeeded.
    SLURM: everything submitted at once (evaluations wait with afterok), then followed.
    """
    done: dict[int, bool] = {}
    for piece in pieces:  # an evaluation of a network that runs again runs again too
        parent_done = piece.parent is None or done[id(piece.parent)]
        done[id(piece)] = parent_done and piece.done()
    print_plan(pieces, done)
    failed: list[str] = []
    spent = estimated = 0.0
    remaining = sum(p.estimate_s or 0.0 for p in pieces if not done[id(p)])
    for piece in pieces:
        if done[id(piece)]:
            print(f"[study] skipped {piece.label}: finished in {piece.folder}", flush=True)
            continue
        if piece.parent is not None and piece.parent.label in failed:
            failed.append(piece.label)
            print(f"[study] not run: {piece.label} (its network did not finish)", flush=True)
            continue
        print(f"[study] === {piece.label} ({piece.folder})", flush=True)
        start = time.perf_counter()
        piece.job = submit_piece(args, piece, cluster)
        if cluster == "slurm":
            continue
        status = follow(piece.job)
        if status == 130:
            raise KeyboardInterrupt
        took = time.perf_counter() - start
        if status:
            failed.append(piece.label)
            continue
        spent += took
        estimated += piece.estimate_s or 0.0
        remaining -= piece.estimate_s or 0.0
        eta = remaining * spent / estimated if estimated else None
        print(
            f"[study] {piece.label} finished in {took:.0f} s (estimate "
            f"{_minutes(piece.estimate_s)}); remaining about {_minutes(eta)}",
            flush=True,
        )
    if cluster == "slurm":
        if not args.wait:
            print(
                "[study] jobs submitted; rerun the same command (or add --wait) to follow "
                "them and write the results: finished pieces are skipped, queued ones "
                "reattached",
                flush=True,
            )
            return None
        for piece in pieces:
            if piece.job is not None:
                status = follow(piece.job)
                if status == 130:
                    raise KeyboardInterrupt
                if status:
                    failed.append(piece.label)
    return failed


def _metric(results: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    value: Any = results
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return None if value is None else float(value)


def collect(pieces: list[Piece]) -> list[dict[str, Any]]:
    """One record per network x evaluation that finished, with its flags and code version."""
    records = []
    for piece in pieces:
        results_file = piece.folder / "results.json"
        if piece.kind != "eval" or not piece.done():
            continue
        results = json.loads(results_file.read_text())
        submitted = json.loads(piece.record_path.read_text())
        parent = piece.parent
        network = "raw_pixels" if parent is None else NETWORKS[parent.kind]
        record = {
            "network": network,
            "arch": piece.arch,
            "seed": piece.seed,
            "evaluation": piece.evaluator,
            "metrics": {
                name: _metric(results, keys)
                for name, (evaluator, keys, _) in METRICS.items()
                if evaluator == piece.evaluator
            },
            "results_file": str(results_file),
            "evaluation_flags": submitted["flags"],
            "training_flags": None if parent is None else parent.flags(),
            "code_version": submitted["code_version"],
        }
        records.append(record)
    return records


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(records: list[dict[str, Any]], archs: list[str]) -> list[dict[str, Any]]:
    """Per metric and arch: mean, spread (sample std over seeds), the untrained value; and
    each arch's difference to the first, called a tie when within the larger spread."""
    rows = []
    for metric, (_, _, label) in METRICS.items():

        def values(network: str, arch: str | None, metric: str = metric) -> list[float]:
            return [
                r["metrics"][metric]
                for r in records
                if r["network"] == network
                and r["arch"] == arch
                and r["metrics"].get(metric) is not None
            ]

        per_arch = {}
        for arch in archs:
            trained = values("trained", arch)
            untrained = values("untrained", arch)
            mean, std = _mean_std(trained) if trained else (None, None)
            per_arch[arch] = {
                "seeds": len(trained),
                "mean": mean,
                "std": std,
                "values": trained,
                "untrained": untrained[0] if untrained else None,
            }
        if all(v["mean"] is None for v in per_arch.values()):
            continue
        first = per_arch[archs[0]]
        for arch in archs[1:]:
            entry = per_arch[arch]
            if entry["mean"] is None or first["mean"] is None:
                continue
            entry["difference"] = entry["mean"] - first["mean"]
            spreads = [s for s in (entry["std"], first["std"]) if s is not None]
            entry["verdict"] = (
                "no spread (one seed)"
                if not spreads
                else "tie"
                if abs(entry["difference"]) <= max(spreads)
                else "better"
                if entry["difference"] > 0
                else "worse"
            )
        pixels = values("raw_pixels", None)
        rows.append(
            {
                "metric": metric,
                "label": label,
                "archs": per_arch,
                "raw_pixels": pixels[0] if pixels else None,
            }
        )
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(rows: list[dict[str, Any]], archs: list[str]) -> str:
    """A Markdown table: mean ± spread (n seeds) per arch, untrained, raw pixels, difference."""
    head = [
        "metric",
        *[f"{a} mean ± std (n)" for a in archs],
        *[f"{a} untrained" for a in archs],
        "raw pixels",
        *[f"{a} − {archs[0]}" for a in archs[1:]],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"]]
        for arch in archs:
            entry = row["archs"][arch]
            cells.append(f"{_fmt(entry['mean'])} ± {_fmt(entry['std'])} ({entry['seeds']})")
        cells += [_fmt(row["archs"][arch]["untrained"]) for arch in archs]
        cells.append(_fmt(row["raw_pixels"]))
        for arch in archs[1:]:
            entry = row["archs"][arch]
            diff = entry.get("difference")
            cells.append("-" if diff is None else f"{diff:+.2f} ({entry['verdict']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure(pieces: list[Piece], rows: list[dict[str, Any]], archs: list[str], path: Path) -> Path:
    panels = []
    for row in rows:
        references = {
            f"{a} untrained": row["archs"][a]["untrained"]
            for a in archs
            if row["archs"][a]["untrained"] is not None
        }
        if row["raw_pixels"] is not None:
            references["raw pixels"] = row["raw_pixels"]
        per_arch = {a: row["archs"][a]["values"] for a in archs}
        panels.append(MetricPanel(row["label"], per_arch, references))
    curves, trends = [], {}
    for piece in pieces:
        if piece.kind != "train" or not piece.checkpoint.is_file():
            continue
        history = (load_checkpoint(piece.checkpoint).get("online_knn") or {}).get("history") or []
        if history:
            curves.append(
                OnlineCurve(
                    piece.arch,
                    piece.seed,
                    [h["epoch"] for h in history],
                    [h["teacher_top1"] for h in history],
                )
            )
        try:
            trends[piece.label] = trends_from_tensorboard(piece.folder)
        except FileNotFoundError:
            continue  # a backbone without GAug (ViT) logs no per-block scalars
    title = (
        f"Does locality help under DINO? {', '.join(archs)}; bars: mean over seeds, dots: "
        "seeds, dashed: baselines"
    )
    return study_figure(panels, curves, trends, archs, path, title)


def report(args: argparse.Namespace, pieces: list[Piece], failed: list[str]) -> dict[str, Any]:
    """Write results.json, the figure and table.md under --output_dir; print the table."""
    out = Path(args.output_dir).resolve()
    records = collect(pieces)
    rows = summarize(records, args.archs)
    table = format_table(rows, args.archs)
    figure = _figure(pieces, rows, args.archs, out / "study.png")
    atomic_write(out / "table.md", lambda handle: handle.write((table + "\n").encode()))
    summary = {
        "study": "does locality help under DINO?",
        "archs": args.archs,
        "budget": args.budget,
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "code_version": code_version(),
        "tie_rule": "a difference no larger than the larger spread (sample std over seeds) "
        "of the two archs is a tie",
        "summary": rows,
        "records": records,
        "failed": failed,
        "figure": str(figure),
    }
    write_json_atomic(out / "results.json", summary)
    print(table, flush=True)
    print(f"[study] results: {out / 'results.json'}, figure: {figure}", flush=True)
    if failed:
        print(f"[study] failed or not run: {', '.join(failed)}", file=sys.stderr, flush=True)
    return summary


def run_study(args: argparse.Namespace) -> int:
    """The whole study as ``launch/study.py`` flags say; returns an exit status."""
    check_submission_args(args)
    cluster = resolve_cluster(args.cluster)
    pieces = plan_study(args)
    start = time.perf_counter()
    try:
        failed = run_pieces(args, pieces, cluster)
    except KeyboardInterrupt:
        print(
            "[study] interrupted: rerun the same command to continue (finished pieces are "
            "skipped, an interrupted training resumes from its checkpoint)",
            file=sys.stderr,
            flush=True,
        )
        return 130
    if failed is None:
        return 0
    report(args, pieces, failed)
    print(f"[study] wall time {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return 1 if failed else 0
