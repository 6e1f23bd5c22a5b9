"""Submit DINO pretraining with submitit (SLURM, local subprocess or in-process).

Example: python launch/dino.py --arch locatvit_s --data_path /data/imagenet/train \\
    --output_dir /ckpt/dino --cluster slurm --nodes 2 --ngpus 8 --partition gpu --eval knn
"""

import argparse

from dino_locat.launching.submission import exit_with, launch_training, training_launch_parser


def get_args_parser() -> argparse.ArgumentParser:
    return training_launch_parser()


def main(args: argparse.Namespace) -> None:
    exit_with(launch_training, args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
