"""Online k-NN curves of DINO runs side by side: a table, its JSON, and a figure.

Example (the preset sweep in docs/sweep/):
    python eval/knn_curves.py --runs output/sweep/* --output_dir docs/sweep
    python eval/knn_curves.py --runs docs/sweep/round3/knn_curves.json output/sweep3/NEW \
        --output_dir docs/sweep/round3
"""

import argparse
import sys
from pathlib import Path

# Run the dino_locat of this checkout, whatever else is installed (dino_locat/checkout.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_locat.checkout import note_other_copies
from dino_locat.errors import run_command
from dino_locat.visualization.knn_curves import write_curves


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Compare the online k-NN curves of DINO runs")
    parser.add_argument(
        "--runs",
        nargs="+",
        required=True,
        help="training --output_dir folders, and knn_curves.json files of earlier comparisons "
        "(their runs join as they were: a sweep whose early run folders are gone)",
    )
    parser.add_argument("--output_dir", required=True, help="where the table and figure go")
    parser.add_argument("--title", default="", help="figure title")
    return parser


def main(args: argparse.Namespace) -> None:
    run_command(lambda: write_curves(args.runs, args.output_dir, args.title))


if __name__ == "__main__":
    note_other_copies()
    main(get_args_parser().parse_args())
