"""Submit DINO pretraining with submitit (SLURM, local subprocess or in-process).

Example: python launch/dino.py --arch locatvit_s --data_path /data/imagenet/train \\
    --output_dir /ckpt/dino --cluster slurm --nodes 2 --ngpus 8 --partition gpu --eval knn
"""

import argparse
import sys
from pathlib import Path

# Run the dino_locat of this checkout, whatever else is installed (dino_locat/checkout.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_locat.checkout import note_other_copies
from dino_locat.launching.submission import exit_with, launch_training, training_launch_parser


def get_args_parser() -> argparse.ArgumentParser:
    return training_launch_parser()


def main(args: argparse.Namespace) -> None:
    exit_with(launch_training, args)


if __name__ == "__main__":
    note_other_copies()
    main(get_args_parser().parse_args())
