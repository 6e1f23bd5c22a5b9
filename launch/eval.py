"""Submit one evaluator with submitit: python launch/eval.py knn --pretrained_weights CKPT ...

The evaluator's flags are those of eval/knn.py, eval/linear.py, eval/segmentation.py,
eval/hummingbird.py.
"""

import argparse

from dino_locat.launching.submission import evaluation_launch_parser, exit_with, launch_evaluation


def get_args_parser() -> argparse.ArgumentParser:
    return evaluation_launch_parser()


def main(args: argparse.Namespace) -> None:
    exit_with(launch_evaluation, args.evaluator, args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
