"""What each piece of the study costs: the numbers behind launch/study.py's ETA (BUDGETS).

Saves the untrained network of an arch (the study's own ``save_untrained``, study preset),
then runs every evaluator CLI on it with the budget's flags, with the image and scene counts
scaled by ``--fraction`` (cost is linear in them), each in a fresh process as a study job
runs. Prints, per piece, the wall and CPU seconds measured and the extrapolation to the full
budget: the start-up (measured apart, an import of the package) is counted once, the rest is
divided by the fraction. CPU seconds hold on a loaded machine where wall seconds do not; on a
quiet 2-core machine, wall ~= CPU / the threads torch keeps busy (about 1.7 of 2).

Run: python tests/benchmarks/bench_study_pieces.py [--arch locatvit_t] [--budget default]
     [--fraction 0.1] [--work_dir /tmp/study_bench]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

from dino_locat.launching.study import BUDGETS
from dino_locat.training.args import get_args_parser as training_args_parser
from dino_locat.training.args import resolve_args
from dino_locat.training.loop import save_untrained

REPO = Path(__file__).resolve().parents[2]
SIZE_FLAGS = ("--train_subset", "--test_subset", "--train_scenes", "--test_scenes")


def scaled(flags: list[str], fraction: float) -> list[str]:
    """The budget's flags with every image/scene count multiplied by ``fraction``."""
    out = list(flags)
    for i, flag in enumerate(out[:-1]):
        if flag in SIZE_FLAGS and int(out[i + 1]) > 0:
            out[i + 1] = str(max(20, round(int(out[i + 1]) * fraction)))
    return out


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the process and its children) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="locatvit_t")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="default")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--work_dir", default="/tmp/study_bench")
    return parser


def main(args: argparse.Namespace) -> None:
    budget = BUDGETS[args.budget]
    work = Path(args.work_dir)
    flags = [f"--{k}={v}" for k, v in budget.train.items()]
    train = training_args_parser().parse_args(
        ["--arch", args.arch, "--preset", "study", "--output_dir", str(work / "untrained"), *flags]
    )
    save_untrained(train)
    checkpoint = str(work / "untrained" / "checkpoint.pth")
    start_wall, start_cpu = timed([sys.executable, "-c", "import dino_locat.launching.study"])
    print(f"start-up (import): {start_wall:.1f} s wall, {start_cpu:.1f} s CPU")
    print(f"{'piece':<14} {'wall s':>8} {'CPU s':>8}   extrapolated to the {args.budget} budget")
    pieces = {name: ["--pretrained_weights", checkpoint] for name in budget.evals}
    size = resolve_args(train)[0].global_crops_size
    pieces["raw_pixels"] = ["--raw_pixels", "--image_size", str(size)]
    for piece, source in pieces.items():
        evaluator = "knn" if piece == "raw_pixels" else piece
        fraction = 1.0 if piece == "raw_pixels" else args.fraction  # cheap: measured whole
        argv = [sys.executable, f"eval/{evaluator}.py", *source]
        argv += [*scaled(budget.evals[evaluator], fraction)]
        argv += ["--output_dir", str(work / f"eval_{piece}")]
        wall, cpu = timed(argv)
        full_cpu = start_cpu + (cpu - start_cpu) / fraction
        print(f"{piece:<14} {wall:>8.1f} {cpu:>8.1f}   {full_cpu:.0f} s CPU", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
