"""Progress on the console (it/s, ETA), one JSON line per epoch, and TensorBoard.

Everything here runs on the host; callers decide when to read device values (once per
logging step), so logging never forces a device sync on every iteration.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from torch.utils.tensorboard import SummaryWriter


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Wraps an iterable of known length; ``due`` says whether this step should log.

    ``log(**values)`` prints ``header [i/total] eta H:MM:SS  x.xx it/s  key: value ...``
    with it/s measured over the steps since the previous line and the ETA from the mean
    step time so far.
    """

    def __init__(
        self,
        iterable: Iterable,
        total: int,
        header: str = "",
        print_freq: int = 10,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.iterable = iterable
        self.total = total
        self.header = header
        self.print_freq = max(1, print_freq)
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.step = -1
        self.start = self.last_time = time.perf_counter()
        self.last_step = 0

    def __iter__(self) -> Iterator:
        self.start = self.last_time = time.perf_counter()
        for step, item in enumerate(self.iterable):
            self.step = step
            yield item

    def __len__(self) -> int:
        return self.total

    @property
    def due(self) -> bool:
        """True on every ``print_freq``-th step and on the last one."""
        return self.step % self.print_freq == 0 or self.step == self.total - 1

    def rate(self) -> tuple[float, float]:
        """(it/s since the last log line, seconds per step since the start)."""
        now = time.perf_counter()
        done = self.step + 1
        window = done - self.last_step
        its = window / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, done
        return its, (now - self.start) / max(done, 1)

    def log(self, its: float, per_step: float, **values: Any) -> None:
        if not self.enabled:
            return
        width = len(str(self.total))
        eta = format_duration(per_step * (self.total - self.step - 1))
        parts = [f"{self.header} [{self.step + 1:>{width}}/{self.total}]", f"eta {eta}"]
        parts.append(f"{its:.2f} it/s")
        for key, value in values.items():
            parts.append(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
        print("  ".join(parts), file=self.stream, flush=True)

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.start
        its = (self.step + 1) / max(elapsed, 1e-9)
        return f"{self.header} done in {format_duration(elapsed)} ({its:.2f} it/s)"


def append_json_line(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON object as one line (a single write, flushed and fsynced)."""
    line = json.dumps(dict(record), sort_keys=False) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def tensorboard_writer(
    output_dir: str | os.PathLike, purge_step: int | None = None
) -> SummaryWriter:
    """A writer under ``output_dir/tensorboard``; ``purge_step`` drops events a resumed run
    is about to write again (the replayed part of an interrupted epoch)."""
    return SummaryWriter(log_dir=os.fspath(Path(output_dir) / "tensorboard"), purge_step=purge_step)
