"""Which copy of dino_locat runs: the one in the checkout a script lives in.

``eval/*.py`` and ``launch/*.py`` put their own checkout first on ``sys.path`` before they
import dino_locat, so a script always runs the code beside it, whatever else is installed
(another clone installed with ``pip install -e``, one on PYTHONPATH, or an editable install
whose folder was deleted). This module tells the user when another copy was passed over,
hands the same copy to the jobs a launcher starts, and names the code's git commit.
"""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# The folder that makes `import dino_locat` find this copy: a checkout's root (or, for a
# regular install, its site-packages).
ROOT = PACKAGE.parent


def other_copies() -> list[Path]:
    """Package folders of every other dino_locat that ``import dino_locat`` could find here:
    on ``sys.path`` (PYTHONPATH, the current folder) or through an installed import hook
    (``pip install -e`` of another clone). A hook whose folder is gone finds nothing."""
    found: dict[Path, None] = {}

    def keep(spec: importlib.machinery.ModuleSpec | None) -> None:
        if spec is not None and spec.origin and spec.origin.endswith("__init__.py"):
            folder = Path(spec.origin).resolve().parent
            if folder != PACKAGE:
                found[folder] = None

    for entry in sys.path:
        keep(importlib.machinery.PathFinder.find_spec("dino_locat", [entry or os.getcwd()]))
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder or not hasattr(finder, "find_spec"):
            continue
        try:
            keep(finder.find_spec("dino_locat", None))
        except (ImportError, OSError, ValueError):
            continue
    return list(found)


def note_other_copies() -> None:
    """One line on stderr when another dino_locat exists that this script does not run."""
    others = other_copies()
    if others:
        shown = ", ".join(str(folder) for folder in others)
        print(
            f"note: running dino_locat from {PACKAGE}; the copy at {shown} (installed or on "
            "PYTHONPATH) is not used by this script",
            file=sys.stderr,
            flush=True,
        )


def use_in_children() -> None:
    """Put this copy first on PYTHONPATH, so that jobs started from here (submitit's local
    subprocesses, SLURM jobs, which inherit the environment) run the same code wherever they
    start."""
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if paths[0] != str(ROOT):
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, paths)])


def code_version() -> str:
    """The git commit of this copy's checkout (``+dirty`` with local changes), if any."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")
