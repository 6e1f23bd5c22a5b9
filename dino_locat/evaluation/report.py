"""Where evaluation results go: stdout, an atomically written JSON file, TensorBoard.

With several processes only rank 0 writes: on the others a Report records nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dino_locat.checkpoint import save_checkpoint
from dino_locat.distributed import is_main_process
from dino_locat.files import atomic_write
from dino_locat.logging import tensorboard_writer


def write_json_atomic(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as JSON via a temp file + rename: readers never see half a file."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


class _Unwritten:
    """What a Report of a rank other than 0 has for a TensorBoard writer: every call is
    accepted and dropped, so evaluators log the same way on every rank."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class Report:
    """One evaluation's outputs under ``output_dir``: results.json and tensorboard/.

    The folder and the TensorBoard writer are made on first use, so an evaluation that
    fails on its inputs (a damaged checkpoint) leaves nothing behind.
    """

    def __init__(self, output_dir: str | os.PathLike, name: str) -> None:
        self.output_dir = Path(output_dir)
        self.name = name
        self.writes = is_main_process()
        self._writer: Any = None if self.writes else _Unwritten()

    @property
    def writer(self) -> Any:
        if self._writer is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._writer = tensorboard_writer(self.output_dir)
        return self._writer

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(f"{self.name}/{tag}", value, global_step=step)

    def save_checkpoint(self, state: Mapping[str, Any], path: str | os.PathLike) -> Path:
        """Save a trained head (or any state) as the checkpoint module does, on rank 0."""
        return save_checkpoint(state, path) if self.writes else Path(path)

    def finish(self, results: Mapping[str, Any]) -> Path:
        """Write results.json and flush TensorBoard; returns the JSON path."""
        if not self.writes:
            return self.output_dir / "results.json"
        self.writer.add_text(f"{self.name}/results", f"```\n{json.dumps(results, indent=2)}\n```")
        self.writer.close()
        path = write_json_atomic(self.output_dir / "results.json", results)
        print(f"results written to {path} (TensorBoard: {self.output_dir / 'tensorboard'})")
        return path
