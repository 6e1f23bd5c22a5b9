"""Locality figures of a pretrained backbone: CLS attention per head (all models), GAug
bias of query patches per block and head, and var/alpha per block (LocAtViT only).

Example (embedded Fashion-MNIST test images):
    python eval/visualize.py --pretrained_weights output/dino_locatvit_s/checkpoint.pth \\
        --output_dir docs/figures --num_images 4 --threshold 0.6
"""

import argparse
import sys
from pathlib import Path

# Run the dino_locat of this checkout, whatever else is installed (dino_locat/checkout.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_locat.checkout import note_other_copies
from dino_locat.errors import run_command
from dino_locat.evaluation.options import add_backbone_args
from dino_locat.visualization.commands import visualize_checkpoint


def query_patch(text: str) -> tuple[int, int]:
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROW,COL (e.g. 3,4), got {text!r}") from None
    return row, col


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Visualise attention and GAug of a backbone")
    add_backbone_args(parser)
    parser.add_argument("--output_dir", default="visualizations", help="where PNGs go")
    parser.add_argument(
        "--images", nargs="+", default=None, help="image files (else the test split)"
    )
    parser.add_argument("--num_images", type=int, default=4, help="test-split images to use")
    parser.add_argument("--data_path", default=None, help="folder with the Fashion-MNIST idx files")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="also show the patches holding this fraction of each head's attention (DINO: 0.6)",
    )
    parser.add_argument(
        "--query_patches",
        nargs="+",
        type=query_patch,
        default=None,
        metavar="ROW,COL",
        help="query patches for the GAug bias (default: centre and top-left)",
    )
    parser.add_argument(
        "--bias_images", type=int, default=1, help="images that get GAug bias figures (1)"
    )
    parser.add_argument("--device", default="cpu")
    return parser


def main(args: argparse.Namespace) -> None:
    run_command(
        lambda: visualize_checkpoint(
            pretrained_weights=args.pretrained_weights,
            output_dir=args.output_dir,
            images=args.images,
            num_images=args.num_images,
            data_path=args.data_path,
            image_size=args.image_size,
            arch=args.arch,
            patch_size=args.patch_size,
            checkpoint_key=args.checkpoint_key,
            pos_embed_interpolation=args.pos_embed_interpolation,
            threshold=args.threshold,
            query_patches=args.query_patches,
            bias_images=args.bias_images,
            device=args.device,
        )
    )


if __name__ == "__main__":
    note_other_copies()
    main(get_args_parser().parse_args())
