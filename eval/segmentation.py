"""Frozen-backbone semantic segmentation (mIoU); see dino_locat.evaluation.segmentation."""

import argparse
import sys
from pathlib import Path

# Run the dino_locat of this checkout, whatever else is installed (dino_locat/checkout.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_locat.checkout import note_other_copies
from dino_locat.evaluation.options import run_cli
from dino_locat.evaluation.segmentation import get_args_parser as segmentation_args_parser
from dino_locat.evaluation.segmentation import run_segmentation


def get_args_parser() -> argparse.ArgumentParser:
    return segmentation_args_parser()


def main(args: argparse.Namespace) -> None:
    run_cli(run_segmentation, args)


if __name__ == "__main__":
    note_other_copies()
    main(get_args_parser().parse_args())
