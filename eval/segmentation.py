"""Frozen-backbone semantic segmentation (mIoU); see dino_locat.evaluation.segmentation."""

import argparse

from dino_locat.evaluation.options import run_cli
from dino_locat.evaluation.segmentation import get_args_parser as segmentation_args_parser
from dino_locat.evaluation.segmentation import run_segmentation


def get_args_parser() -> argparse.ArgumentParser:
    return segmentation_args_parser()


def main(args: argparse.Namespace) -> None:
    run_cli(run_segmentation, args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
