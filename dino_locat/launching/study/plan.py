"""The study's plan: every piece (training, untrained network, evaluation) with its flags,
how big the study is (BUDGETS, the one place that sizes it), and what is already finished.

Paths inside the study folder are recorded relative to it (``study_piece.json`` here,
``results.json`` in :mod:`.report`), so a study folder can be moved or copied and rerun or read
where it lies.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from dino_locat.checkpoint import RESUME_HINT, checkpoint_args, load_checkpoint, plain_args
from dino_locat.launching.options import add_submission_args
from dino_locat.launching.submission import EVALUATORS, add_eval_flags
from dino_locat.training import get_args_parser as training_args_parser
from dino_locat.training import main as train_main
from dino_locat.training.args import resolve_args
from dino_locat.training.loop import save_untrained
from dino_locat.training.online_knn import FASHION_MNIST_TRAIN

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


def study_relative(value: Any, root: Path) -> Any:
    """``value`` (a path, flags, a record) with every absolute path inside the study folder
    ``root`` written relative to it; other values, and paths outside (a --data_path), as
    they are."""
    if isinstance(value, str):
        path = Path(value)
        if path.is_absolute() and path.is_relative_to(root):
            return path.relative_to(root).as_posix()
        return value
    if isinstance(value, list):
        return [study_relative(item, root) for item in value]
    if isinstance(value, dict):
        return {key: study_relative(item, root) for key, item in value.items()}
    return value


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
    preset: str = "study"  # the training preset (dino_locat/training/args.py) under train


# The one place that sizes the study. Seconds per piece on a quiet 2-core CPU machine:
# evaluators from `python tests/benchmarks/bench_study_pieces.py --fraction 0.1` (CPU seconds
# on a tenth of each set, extrapolated linearly; the full k-NN piece measured 88.5 CPU s
# against 84 extrapolated; quiet wall ~0.85 x CPU, as torch keeps barely one core busy on
# these small models), a Python start-up of ~8 s per job included; training from round 3 of
# the sweep (docs/sweep/round3/README.md), whose 57,000-view runs took 14-19 minutes. The
# default study trains where DINO learns on 2 cores: round 3's base recipe on 28,500
# distinct images x 4 epochs (114,000 image views, warm-up 10%), about 32 minutes per run,
# so `default` adds up to about 2.5 hours (2 archs x 2 seeds, 25 evaluations), two of them
# training.
_SMALL_LINEAR = ["--epochs", "10", "--lrs", "0.001", "0.01", "0.1"]
_DEFAULT_EVALS = {
    "knn": ["--train_subset", "10000", "--test_subset", "2000", "--num_workers", "1"],
    "linear": ["--train_subset", "10000", "--test_subset", "2000", "--num_workers", "1"],
    "segmentation": ["--protocol", "fast", "--train_scenes", "1000", "--test_scenes", "250",
                     "--num_workers", "1"],
    "hummingbird": ["--train_scenes", "1000", "--test_scenes", "250", "--num_workers", "1"],
}  # fmt: skip
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
        train={"subset": 28500, "epochs": 4, "warmup_epochs": 0.4},
        evals=_DEFAULT_EVALS,
        seconds={"train": 1920, "untrained": 15, "knn": 80, "raw_pixels": 15, "linear": 90,
                 "segmentation": 75, "hummingbird": 40},
    ),
    # `--preset long` (about two hours of locatvit_t) with the default study's evaluators:
    # `--budget long --archs locatvit_t` is the command of the published long run.
    "long": Budget(
        seeds=(0,),
        train={},
        evals=_DEFAULT_EVALS,
        seconds={"train": 7200, "untrained": 15, "knn": 80, "raw_pixels": 15, "linear": 90,
                 "segmentation": 75, "hummingbird": 40},
        preset="long",
    ),
    "large": Budget(
        seeds=(0, 1, 2),
        train={"subset": 0, "epochs": 12, "warmup_epochs": 1.2, "depth": 12, "patch_size": 4},
        evals={
            "knn": ["--train_subset", "0", "--test_subset", "0"],
            "linear": ["--train_subset", "0", "--test_subset", "0"],
            "segmentation": ["--protocol", "fast", "--train_scenes", "4000", "--test_scenes",
                             "1000"],
            "hummingbird": ["--train_scenes", "4000", "--test_scenes", "1000"],
        },
        # default's seconds x 4 (patch 4: 4x the tokens) x the image-view (data) ratios
        seconds={"train": 1920 * 4 * 720000 // 114000, "untrained": 15, "knn": 80 * 4 * 6,
                 "raw_pixels": 15 * 6, "linear": 90 * 4 * 6, "segmentation": 75 * 4 * 4,
                 "hummingbird": 40 * 4 * 4},
    ),
}  # fmt: skip


@dataclass
class Piece:
    """One job of the study: a training, an untrained network, or one evaluation."""

    kind: str  # train | untrained | eval
    label: str
    root: Path  # the study folder (--output_dir, resolved)
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

    def recorded_flags(self) -> dict[str, Any]:
        """The flags as ``study_piece.json`` records them (relative to the study folder)."""
        return study_relative(self.flags(), self.root)

    def planned_as(self, record: dict[str, Any]) -> bool:
        """Whether a ``study_piece.json`` record is of this piece's flags (records of older
        versions hold absolute paths: those inside this study folder compare equal too; a
        flag the evaluator gained since is equal when it is planned at its default)."""
        recorded = study_relative(record.get("flags"), self.root)
        if not isinstance(recorded, dict):
            return False
        planned = self.recorded_flags()
        if self.evaluator is not None:
            defaults = vars(EVALUATORS[self.evaluator][0]().parse_args([]))
            recorded = {
                **{k: v for k, v in planned.items() if k not in recorded and v == defaults.get(k)},
                **recorded,
            }
        return recorded == planned

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
            return self.planned_as(recorded) and newer
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
        help="size on the embedded data: small (~12 min on a quiet 2-core CPU: a smoke "
        "test, no learning), default (~2.5 h quiet: 114,000 image views per run, where DINO "
        "learns), long (--preset long, about 2 h per run, seed 0), large (the whole train "
        "split x 12 epochs, patch 4, 3 seeds, full evaluation sets: for a GPU); flags you "
        "pass win (default: %(default)s)",
    )
    study.add_argument("--output_dir", default="output/study", help="(default: %(default)s)")
    add_eval_flags(study, default=list(EVALUATORS))
    study.add_argument(
        "--no_untrained", action="store_true", help="skip the untrained-network baselines"
    )
    study.add_argument(
        "--baselines_only",
        action="store_true",
        help="train nothing: only the untrained networks (first seed) and raw pixels, the "
        "numbers a trained network must beat (about 25 min of the default study)",
    )
    study.add_argument(
        "--report_only",
        action="store_true",
        help="run nothing: write results.json, the table and the figure from the pieces "
        "already finished (a study still running, or stopped early)",
    )
    study.add_argument(
        "--combine",
        nargs="+",
        metavar="RESULTS",
        default=None,
        help="run nothing: write one report under --output_dir from the results.json of "
        "parts of one study run apart (e.g. --seeds 0 on one machine, --seeds 1 on another); "
        "parts whose flags differ beyond arch, seed and folder are refused",
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
    preset = "main" if args.data_path else budget.preset

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
                    out,
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
    for seed in [] if args.baselines_only else seeds:
        for arch in args.archs:
            folder = out / "runs" / f"{arch}_seed{seed}"
            run_args = train_args(arch, seed, folder)
            run = Piece(
                "train",
                f"{arch} seed {seed}",
                out,
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
                out,
                folder,
                save_untrained,
                train_args(arch, seeds[0], folder),
                seconds("untrained", 1.0),
                0,
                arch,
                seeds[0],
            )
            pieces += [untrained, *evaluations(untrained)]
    # Raw pixels through every evaluator: k-NN and the linear probe on the whole image, the
    # dense probes on pixel patches on the trained networks' token grid.
    size, patch = str(reference.global_crops_size), str(reference.patch_size)
    dense = ["--patch_size", patch, *(["--image_size", size] if args.data_path else [])]
    raw_flags = {"knn": ["--image_size", size], "linear": ["--image_size", size],
                 "segmentation": dense, "hummingbird": dense}  # fmt: skip
    for name in args.eval:
        parser = EVALUATORS[name][0]()
        parser.prog = f"--eval_args {name}="
        folder = out / "raw_pixels" / f"eval_{name}"
        flags = ["--raw_pixels", *raw_flags[name], *eval_flags[name], "--output_dir", str(folder)]
        raw_args = parser.parse_args(flags)
        pieces.append(
            Piece(
                "eval",
                f"{name} on raw pixels",
                out,
                folder,
                EVALUATORS[name][1],
                raw_args,
                seconds("raw_pixels" if name == "knn" else name, 1.0),
                raw_args.num_workers,
                evaluator=name,
            )
        )
    return pieces


def _budget_run(arch: str, budget: Budget) -> argparse.Namespace:
    """The training the budget's seconds were measured on: its preset + its flags."""
    parser = training_args_parser(add_help=False)
    flags = [f"--{k}={v}" for k, v in budget.train.items()]
    argv = ["--arch", arch, "--preset", budget.preset, *flags]
    return resolve_args(parser.parse_args(argv))[0]


def _images_seen(args: argparse.Namespace) -> float:
    return float(args.epochs * (args.subset or FASHION_MNIST_TRAIN))


def minutes(seconds: float | None) -> str:
    """A duration as the plan and the ETA print it ("?" where unknown)."""
    if seconds is None:
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def print_plan(pieces: list[Piece], done: dict[int, bool]) -> None:
    """What will run, what is already finished, and the ETA from the per-piece estimates."""
    todo = [p for p in pieces if not done[id(p)]]
    print(f"[study] {len(pieces)} pieces, {len(pieces) - len(todo)} already finished", flush=True)
    for piece in pieces:
        state = "finished, skipped" if done[id(piece)] else f"~{minutes(piece.estimate_s)}"
        print(f"[study]   {piece.label:<46} {state}", flush=True)
    estimates = [p.estimate_s for p in todo]
    if any(e is None for e in estimates):
        print("[study] ETA: unknown (no per-piece costs for --data_path)", flush=True)
    else:
        total = sum(e for e in estimates if e is not None)
        print(
            f"[study] ETA: about {minutes(total)}, one job after another on a quiet 2-core CPU "
            "(per-piece costs: BUDGETS in dino_locat/launching/study/plan.py; longer on a busy "
            "machine, shorter on a GPU)",
            flush=True,
        )
