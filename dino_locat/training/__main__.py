"""``python -m dino_locat.training [flags]``: DINO pretraining in this process.

Under torchrun every rank runs this. A rank that sees another rank die (or stop answering)
ends with one line naming itself, its node and the ranks it lost, not a traceback: the
traceback that matters is the one of the rank that failed.
"""

import sys

from dino_locat.checkpoint import CheckpointError
from dino_locat.distributed import (
    DistributedError,
    describe_peer_failure,
    is_peer_failure,
    resolve_environment,
)
from dino_locat.training import NonFiniteLossError, get_args_parser, main

if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (CheckpointError, NonFiniteLossError, ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    except DistributedError as err:  # already one line naming the rank and node
        sys.exit(f"error: {err}")
    except RuntimeError as err:
        env = resolve_environment()
        if env.world_size > 1 and is_peer_failure(err):
            sys.exit(f"error: {describe_peer_failure(err, env.rank, env.world_size)}")
        raise
