"""``python -m dino_locat.training [flags]``: DINO pretraining in this process.

Bad input (a flag, a damaged checkpoint, an unreadable image) ends with one line and exit
status 2 (:mod:`dino_locat.errors`). Under torchrun every rank runs this: a rank that sees
another rank die (or stop answering) ends with one line naming itself, its node and the
ranks it lost, and exit status 1, not a traceback: the traceback that matters is the one
of the rank that failed.
"""

import sys

from dino_locat.checkout import note_other_copies
from dino_locat.distributed import (
    DistributedError,
    describe_peer_failure,
    is_peer_failure,
    resolve_environment,
)
from dino_locat.errors import run_command
from dino_locat.training import NonFiniteLossError, get_args_parser, main

if __name__ == "__main__":
    note_other_copies()
    try:
        run_command(main, get_args_parser().parse_args(), also=(NonFiniteLossError,))
    except DistributedError as err:  # already one line naming the rank and node
        sys.exit(f"error: {err}")
    except RuntimeError as err:
        env = resolve_environment()
        if env.world_size > 1 and is_peer_failure(err):
            sys.exit(f"error: {describe_peer_failure(err, env.rank, env.world_size)}")
        raise
