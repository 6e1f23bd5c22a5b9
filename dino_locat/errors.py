"""How every command ends on bad input: one line on stderr, exit status 2, no traceback.

A user who passes a damaged checkpoint, an unreadable image or a contradictory flag needs
the file or flag and what to do about it, not thirty lines of torch internals. Every entry
point (training, the evaluators, export, the launchers, the study) runs through
:func:`run_command` or, where it manages ranks itself, :func:`fail`, so all end the same way.
Bugs (any other exception) keep their traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")

# The status of every rejected input, as argparse uses for a bad flag.
USER_ERROR_STATUS = 2


class InputError(Exception):
    """Something the user gave (a file, a folder, a flag) cannot be used; the message says
    which and what to do."""


# What counts as the user's input going wrong: ours, the ValueErrors that flag checks
# raise, and the OSErrors of a missing or unreadable path.
USER_ERRORS: tuple[type[BaseException], ...] = (InputError, ValueError, OSError)


def user_message(err: BaseException) -> str:
    """The error's own message, also when a DataLoader worker raised it.

    torch re-raises a worker's exception in the main process with the worker's whole
    traceback as its message ("Caught X in DataLoader worker process 0. Original
    Traceback ..."); the message the code raised is what follows the last ``X: ``.
    """
    text = str(err).strip()
    if "Original Traceback" in text:
        cls = type(err)
        for name in (f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__):
            marker = f"\n{name}: "
            if marker in text:
                return text.rsplit(marker, 1)[1].strip()
    return text or type(err).__name__


def fail(err: BaseException, where: str = "error") -> NoReturn:
    """Print ``where: message`` to stderr and exit with :data:`USER_ERROR_STATUS`."""
    print(f"{where}: {user_message(err)}", file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_STATUS) from None


def run_command(
    run: Callable[..., T], *args: object, also: tuple[type[BaseException], ...] = ()
) -> T:
    """``run(*args)``; a user error (:data:`USER_ERRORS` and ``also``) ends the process
    through :func:`fail`."""
    try:
        return run(*args)
    except (*USER_ERRORS, *also) as err:
        fail(err)
