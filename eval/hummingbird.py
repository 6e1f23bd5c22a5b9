"""Hummingbird dense nearest-neighbour retrieval (mIoU); see dino_locat.evaluation.hummingbird."""

import argparse

from dino_locat.evaluation.hummingbird import get_args_parser as hummingbird_args_parser
from dino_locat.evaluation.hummingbird import run_hummingbird
from dino_locat.evaluation.options import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    return hummingbird_args_parser()


def main(args: argparse.Namespace) -> None:
    run_cli(run_hummingbird, args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
