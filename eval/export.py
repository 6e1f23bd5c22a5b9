"""Take a pretrained backbone away: write it as .safetensors (for timm) or .pth (for DINO).

Examples:
    python eval/export.py --pretrained_weights output/dino_locatvit_s --output vit.safetensors
    python eval/export.py --pretrained_weights CKPT --checkpoint_key student --output student.pth

Then, in code that knows timm but not this project's training:
    import timm, dino_locat.models
    model = timm.create_model("locatvit_s", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file="vit.safetensors"))
"""

import argparse
import sys
from pathlib import Path

# Run the dino_locat of this checkout, whatever else is installed (dino_locat/checkout.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_locat.checkout import note_other_copies
from dino_locat.checkpoint import export_backbone
from dino_locat.errors import run_command
from dino_locat.models import POS_EMBED_INTERPOLATIONS


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "eval/export.py",
        description="Write the backbone of a checkpoint as .safetensors (state_dict with timm "
        "key names + metadata: arch, patch size, depth, image size, position-embedding rule, "
        "source epoch and sha256) or .pth (DINO's backbone-only state_dict).",
    )
    parser.add_argument(
        "--pretrained_weights",
        required=True,
        help="our checkpoint.pth (or its output_dir), an official DINO checkpoint, a bare / "
        "timm backbone state_dict, or an export",
    )
    parser.add_argument(
        "--checkpoint_key",
        default="teacher",
        help="which network of a training checkpoint: teacher (default) or student",
    )
    parser.add_argument(
        "--output", required=True, help="FILE.safetensors (timm, with metadata) or FILE.pth (DINO)"
    )
    parser.add_argument(
        "--pos_embed_interpolation",
        choices=("auto", *POS_EMBED_INTERPOLATIONS),
        default="auto",
        help="the position-embedding rule recorded in the metadata (auto: the one the "
        "evaluators would use for this checkpoint)",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    result = run_command(
        export_backbone,
        args.pretrained_weights,
        args.output,
        args.checkpoint_key,
        args.pos_embed_interpolation,
    )
    meta = result["metadata"]
    print(
        f"exported {meta['arch']} depth {meta['depth']}, patch {meta['patch_size']}, "
        f"{meta['img_size']} px ({result['tensors']} tensors) from {result['checkpoint']} "
        f"to {result['output']}"
    )
    if args.output.endswith(".pth") and meta["pos_embed_interpolation"] != "timm":
        print(
            "note: a .pth holds no metadata; evaluate it with --pos_embed_interpolation "
            f"{meta['pos_embed_interpolation']} to resample position embeddings as its source"
        )


if __name__ == "__main__":
    note_other_copies()
    main(get_args_parser().parse_args())
