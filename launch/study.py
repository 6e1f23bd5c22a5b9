"""Does locality help under DINO? DINO-pretrain vit_t and locatvit_t over seeds with identical
settings, evaluate every teacher and the baselines, write results.json, a figure, a table.

Example: python launch/study.py --cluster local        (the default study, ~2 h on 2 cores)
         python launch/study.py --budget large --cluster slurm --ngpus 1 --partition gpu
"""

import argparse
import sys
from pathlib import Path

# Run the dino_locat of this checkout, whatever else is installed (dino_locat/checkout.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_locat.checkout import note_other_copies
from dino_locat.launching.study import get_args_parser as study_args_parser
from dino_locat.launching.study import run_study
from dino_locat.launching.submission import exit_with


def get_args_parser() -> argparse.ArgumentParser:
    return study_args_parser()


def main(args: argparse.Namespace) -> None:
    exit_with(run_study, args)


if __name__ == "__main__":
    note_other_copies()
    main(get_args_parser().parse_args())
