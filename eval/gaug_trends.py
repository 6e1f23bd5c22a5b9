"""Collapse or saturate? Mean GAug var and alpha per block against epoch for one run,
from its TensorBoard scalars or by running each checkpoint's teacher on fixed images.

Example:
    python eval/gaug_trends.py --run_dir output/dino_locatvit_s --output_dir docs/figures
"""

import argparse
import sys
from pathlib import Path

# Run the dino_locat of this checkout, whatever else is installed (dino_locat/checkout.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_locat.checkout import note_other_copies
from dino_locat.errors import run_command
from dino_locat.evaluation.options import add_backbone_args
from dino_locat.visualization.commands import plot_gaug_trends


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Plot GAug var/alpha per block against epoch")
    parser.add_argument("--run_dir", required=True, help="a training --output_dir")
    parser.add_argument("--output_dir", default=None, help="default: the run directory")
    parser.add_argument(
        "--source",
        choices=("auto", "checkpoints", "tensorboard"),
        default="auto",
        help="auto: TensorBoard scalars when logged, else the checkpoints",
    )
    add_backbone_args(parser, weights=False)
    parser.add_argument(
        "--images", nargs="+", default=None, help="image files (else the test split)"
    )
    parser.add_argument("--num_images", type=int, default=16, help="test-split images to use")
    parser.add_argument("--data_path", default=None, help="folder with the Fashion-MNIST idx files")
    parser.add_argument("--device", default="cpu")
    return parser


def main(args: argparse.Namespace) -> None:
    run_command(
        lambda: plot_gaug_trends(
            run_dir=args.run_dir,
            output_dir=args.output_dir or args.run_dir,
            source=args.source,
            images=args.images,
            num_images=args.num_images,
            data_path=args.data_path,
            image_size=args.image_size,
            arch=args.arch,
            patch_size=args.patch_size,
            checkpoint_key=args.checkpoint_key,
            pos_embed_interpolation=args.pos_embed_interpolation,
            device=args.device,
        )
    )


if __name__ == "__main__":
    note_other_copies()
    main(get_args_parser().parse_args())
