"""Does locality help under DINO? DINO-pretrain vit_t and locatvit_t over seeds with identical
settings, evaluate every teacher and the baselines, write results.json, a figure, a table.

Example: python launch/study.py --cluster local        (the default study, ~2 h on 2 cores)
         python launch/study.py --budget large --cluster slurm --ngpus 1 --partition gpu
"""

import argparse

from dino_locat.launching.study import get_args_parser as study_args_parser
from dino_locat.launching.study import run_study
from dino_locat.launching.submission import exit_with


def get_args_parser() -> argparse.ArgumentParser:
    return study_args_parser()


def main(args: argparse.Namespace) -> None:
    exit_with(run_study, args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
