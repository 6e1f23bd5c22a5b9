"""``python -m dino_locat.training [flags]``: DINO pretraining in this process."""

from dino_locat.checkout import note_other_copies
from dino_locat.errors import run_command
from dino_locat.training import NonFiniteLossError, get_args_parser, main

if __name__ == "__main__":
    note_other_copies()
    run_command(main, get_args_parser().parse_args(), also=(NonFiniteLossError,))
