"""Linear probe of a frozen backbone (grid of heads); see dino_locat.evaluation.linear."""

import argparse

from dino_locat.evaluation.linear import get_args_parser as linear_args_parser
from dino_locat.evaluation.linear import run_linear
from dino_locat.evaluation.options import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    return linear_args_parser()


def main(args: argparse.Namespace) -> None:
    run_cli(run_linear, args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
