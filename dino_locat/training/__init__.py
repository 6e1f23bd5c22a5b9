"""DINO pretraining: ``get_args_parser()`` and ``main(args)``.

Also runnable in-process as ``python -m dino_locat.training [flags]``.
"""

from dino_locat.training.args import get_args_parser
from dino_locat.training.loop import NonFiniteLossError, main

__all__ = ["NonFiniteLossError", "get_args_parser", "main"]
