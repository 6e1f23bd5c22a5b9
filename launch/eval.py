"""Submit one evaluator with submitit: python launch/eval.py knn --pretrained_weights CKPT ...

The evaluator's flags are those of eval/knn.py, eval/linear.py, eval/segmentation.py,
eval/hummingbird.py.
"""

import argparse
import sys
from pathlib import Path

# Run the dino_locat of this checkout, whatever else is installed (dino_locat/checkout.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_locat.checkout import note_other_copies
from dino_locat.launching.submission import evaluation_launch_parser, exit_with, launch_evaluation


def get_args_parser() -> argparse.ArgumentParser:
    return evaluation_launch_parser()


def main(args: argparse.Namespace) -> None:
    exit_with(launch_evaluation, args.evaluator, args)


if __name__ == "__main__":
    note_other_copies()
    main(get_args_parser().parse_args())
