"""``python -m dino_locat.training [flags]``: DINO pretraining in this process."""

import sys

from dino_locat.checkout import note_other_copies
from dino_locat.checkpoint import CheckpointError
from dino_locat.training import NonFiniteLossError, get_args_parser, main

if __name__ == "__main__":
    note_other_copies()
    try:
        main(get_args_parser().parse_args())
    except (CheckpointError, NonFiniteLossError, ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
