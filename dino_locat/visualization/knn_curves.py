"""Online k-NN curves of several DINO runs side by side: did they learn, and how fast?

Each run's ``checkpoint.pth`` keeps its online k-NN history (teacher and student 20-NN
top-1 before the first step and every ``--knn_freq`` epochs, with the training seconds
spent so far) and the raw-pixel baseline. This module turns a set of runs into a table
(markdown + JSON) and a figure against training minutes, the yardstick of a preset sweep.
The JSON keeps every run whole (flags, history, learning signals), so a sweep that spans
several sessions, whose early run folders are gone, is redrawn from it plus the new runs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dino_locat.checkpoint import checkpoint_args, load_checkpoint
from dino_locat.files import atomic_write
from dino_locat.seeds import mean_std
from dino_locat.training.resume import LEGACY_VALUES
from dino_locat.visualization.figures import new_figure, save_png
from dino_locat.visualization.trends import event_dirs

# Flags that describe a sweep configuration (shown in the table when they differ).
SWEEP_FLAGS = (
    "arch",
    "depth",
    "patch_size",
    "global_crops_size",
    "local_crops_size",
    "local_crops_number",
    "global_crops_scale",
    "local_crops_scale",
    "out_dim",
    "batch_size_per_gpu",
    "subset",
    "epochs",
    "lr",
    "warmup_epochs",
    "momentum_teacher",
    "momentum_teacher_end",
    "teacher_temp",
    "warmup_teacher_temp",
    "warmup_teacher_temp_epochs",
    "freeze_last_layer",
    "drop_path_rate",
    "weight_decay",
    "weight_decay_end",
    "norm_last_layer",
    "centering",
    "koleo_loss_weight",
    "pos_embed_interpolation",
    "seed",
)


# Flags added after some runs were made: their value in those runs.
LATER_FLAG_DEFAULTS = {"momentum_teacher_end": 1.0, **LEGACY_VALUES}


# The learning signals training logs to TensorBoard, and how each is drawn.
SIGNAL_PANELS = (
    ("signals/teacher_entropy", "teacher entropy / ln K (1 = uniform)", "lnK"),
    ("signals/prototypes_in_use", "prototypes in use / K (0 = collapse)", "K"),
    ("signals/kl_teacher_student", "KL(teacher || student) / ln K", "lnK"),
)


@dataclass
class RunCurve:
    name: str
    args: dict[str, Any]
    history: list[dict[str, Any]]
    raw_pixels: float | None
    signals: dict[str, list[tuple[int, float]]] | None = None
    # The last value of each signal, for runs read from a JSON file that kept only that.
    final_signals: dict[str, float] | None = None

    @property
    def untrained(self) -> float:
        return float(self.history[0]["teacher_top1"])

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1]

    def last_signal(self, tag: str) -> float | None:
        """The last logged value of a learning signal, or None without one."""
        points = (self.signals or {}).get(tag)
        if points:
            return float(points[-1][1])
        value = (self.final_signals or {}).get(tag)
        return None if value is None else float(value)

    def summary(self) -> dict[str, Any]:
        """One row: where the run started and ended, its best teacher point, and the state
        of its teacher at the last logged step (entropy over ln K, prototypes in use)."""
        best = max(self.history, key=lambda h: h["teacher_top1"])
        steps = self.final["step"]
        entropy = self.last_signal("signals/teacher_entropy")
        return {
            "run": self.name,
            "epochs_done": self.final["epoch"],
            "steps": steps,
            "train_minutes": self.final["train_time_s"] / 60,
            "untrained": self.untrained,
            "teacher": self.final["teacher_top1"],
            "student": self.final["student_top1"],
            "teacher_gain": self.final["teacher_top1"] - self.untrained,
            "student_gain": self.final["student_top1"] - self.untrained,
            "best_teacher": best["teacher_top1"],
            "best_teacher_epoch": best["epoch"],
            "raw_pixels": self.raw_pixels,
            "knn_seconds_per_eval": sum(h["knn_time_s"] for h in self.history) / len(self.history),
            "end_entropy_over_lnK": (
                None if entropy is None else entropy / math.log(float(self.args["out_dim"]))
            ),
            "end_prototypes_in_use": self.last_signal("signals/prototypes_in_use"),
        }


def read_run(run_dir: str | os.PathLike, name: str | None = None) -> RunCurve:
    """The k-NN history stored in ``run_dir/checkpoint.pth`` (weights_only load)."""
    path = Path(run_dir) / "checkpoint.pth"
    ckpt = load_checkpoint(path)
    online = ckpt.get("online_knn") or {}
    history = list(online.get("history") or [])
    if not history:
        raise ValueError(f"{path} holds no online k-NN history (trained with --knn_freq 0?)")
    args = {**LATER_FLAG_DEFAULTS, **checkpoint_args(ckpt)}
    signals = read_signals(Path(run_dir) / "tensorboard")
    return RunCurve(name or Path(run_dir).name, args, history, online.get("raw_pixels"), signals)


def read_curves_file(path: str | os.PathLike) -> list[RunCurve]:
    """The runs of a ``knn_curves.json`` written by :func:`write_curves`, as they were.

    Files written before the signals were stored keep only each run's last entropy and
    prototypes in use; those fill the table, and the run has no line in ``signals.png``."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())["runs"]
        runs = []
        for entry in entries:
            stored = entry.get("signals")
            signals = (
                None
                if stored is None
                else {tag: [(int(s), float(v)) for s, v in pts] for tag, pts in stored.items()}
            )
            final = None
            if signals is None:
                entropy = entry.get("end_entropy_over_lnK")
                final = {
                    "signals/teacher_entropy": (
                        None if entropy is None else entropy * math.log(entry["flags"]["out_dim"])
                    ),
                    "signals/prototypes_in_use": entry.get("end_prototypes_in_use"),
                }
            runs.append(
                RunCurve(
                    entry["run"],
                    {**LATER_FLAG_DEFAULTS, **entry["flags"]},
                    list(entry["history"]),
                    entry.get("raw_pixels"),
                    signals,
                    final,
                )
            )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path}: not a knn_curves.json of eval/knn_curves.py ({type(error).__name__}: {error})"
        ) from error
    return runs


def read_runs(sources: Sequence[str | os.PathLike]) -> list[RunCurve]:
    """Runs from training folders and from earlier ``knn_curves.json`` files, in order; a
    run name met twice is refused, since the table could not tell the two apart."""
    runs: list[RunCurve] = []
    seen: dict[str, str] = {}
    for source in sources:
        found = (
            read_curves_file(source)
            if Path(source).is_file() and Path(source).suffix == ".json"
            else [read_run(source)]
        )
        for run in found:
            if run.name in seen:
                raise ValueError(
                    f"run {run.name!r} comes from both {seen[run.name]} and {source}: "
                    "leave one out (or rename a run folder)"
                )
            seen[run.name] = str(source)
        runs += found
    return runs


def read_signals(log_dir: Path) -> dict[str, list[tuple[int, float]]] | None:
    """The run's ``signals/*`` scalars as (step, value) lists, or None without event files."""
    series: dict[str, dict[int, float]] = {}
    for folder in event_dirs(log_dir):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag, _, _ in SIGNAL_PANELS:
            if tag in events.Tags()["scalars"]:
                values = series.setdefault(tag, {})
                values.update({e.step: e.value for e in events.Scalars(tag)})
    if not series:
        return None
    return {tag: sorted(values.items()) for tag, values in series.items()}


def differing_flags(runs: Sequence[RunCurve]) -> dict[str, dict[str, Any]]:
    """Per run, the sweep flags whose value is not the same in every run."""
    varying = [
        flag for flag in SWEEP_FLAGS if len({json.dumps(run.args.get(flag)) for run in runs}) > 1
    ]
    return {run.name: {flag: run.args.get(flag) for flag in varying} for run in runs}


SEED_METRICS = ("untrained", "teacher", "student", "teacher_gain", "student_gain")


def seed_groups(runs: Sequence[RunCurve]) -> list[dict[str, Any]]:
    """Runs whose sweep flags agree in everything but ``seed``, pooled: per metric the mean,
    sample std and values over their seeds (groups of one run are left out)."""
    groups: dict[str, list[RunCurve]] = {}
    for run in runs:
        recipe = {flag: run.args.get(flag) for flag in SWEEP_FLAGS if flag != "seed"}
        groups.setdefault(json.dumps(recipe, sort_keys=True), []).append(run)
    pooled = []
    for members in groups.values():
        if len(members) < 2:
            continue
        rows = [member.summary() for member in members]
        entry: dict[str, Any] = {
            "runs": [member.name for member in members],
            "seeds": [member.args.get("seed") for member in members],
        }
        for metric in SEED_METRICS:
            values = [row[metric] for row in rows]
            mean, std = mean_std(values)
            entry[metric] = {"mean": mean, "std": std, "values": values}
        pooled.append(entry)
    return pooled


def _optional(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(runs: Sequence[RunCurve]) -> str:
    """A markdown table, one row per run, the flags shared by all runs, and the runs that
    differ only in their seed pooled into mean ± sample std."""
    flags = differing_flags(runs)
    header = (
        "| run | flags (differing) | steps | train min | untrained | teacher | student | "
        "teacher gain | best teacher (epoch) | raw pixels | teacher entropy / ln K (end) | "
        "prototypes in use (end) |"
    )
    lines = [header, "|" + "---|" * 12]
    for run in runs:
        row = run.summary()
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in flags[run.name].items())
        lines.append(
            f"| {run.name} | {shown} | {row['steps']} | {row['train_minutes']:.1f} | "
            f"{row['untrained']:.1f} | {row['teacher']:.1f} | {row['student']:.1f} | "
            f"{row['teacher_gain']:+.1f} | {row['best_teacher']:.1f} ({row['best_teacher_epoch']})"
            f" | {_optional(row['raw_pixels'], '.1f')} | "
            f"{_optional(row['end_entropy_over_lnK'], '.2f')} | "
            f"{_optional(row['end_prototypes_in_use'], '.1f')} |"
        )
    shared = {
        flag: runs[0].args.get(flag)
        for flag in SWEEP_FLAGS
        if not any(flag in f for f in flags.values())
    }
    lines.append("")
    lines.append("Shared by all runs: " + " ".join(f"{k}={_fmt(v)}" for k, v in shared.items()))
    pooled = seed_groups(runs)
    if pooled:
        lines += [
            "",
            "Across seeds (runs identical but for --seed; mean ± sample std, then each seed):",
            "",
            "| runs | seeds | untrained | teacher | student | teacher gain |",
            "|---|---|---|---|---|---|",
        ]
        for group in pooled:
            cells = [", ".join(group["runs"]), ", ".join(str(s) for s in group["seeds"])]
            for metric in ("untrained", "teacher", "student", "teacher_gain"):
                stats = group[metric]
                each = ", ".join(f"{v:.1f}" for v in stats["values"])
                cells.append(f"{stats['mean']:.1f} ± {stats['std']:.1f} ({each})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_fmt(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _finish(
    fig: Figure,
    path: str | os.PathLike,
    title: str,
    left: float,
    bottom: float,
    top: tuple[float, float],
) -> Path:
    """Legend in the first panel, the title, margins (``top`` without / with a title); save."""
    fig.axes[0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=left, right=0.99, bottom=bottom, top=top[1] if title else top[0])
    return save_png(fig, path)


def run_styles(count: int) -> list[dict[str, Any]]:
    """A colour and line style per run that no other run of the figure shares: matplotlib's
    10-colour cycle repeats from the 11th run on, which made sweeps of more runs unreadable."""
    palette = colormaps["tab10" if count <= 10 else "tab20"]
    size = len(palette.colors)
    dashes = ("-", "--", ":", "-.")
    return [
        {"color": palette.colors[i % size], "linestyle": dashes[i // size % len(dashes)]}
        for i in range(count)
    ]


def plot_knn_curves(runs: Sequence[RunCurve], path: str | os.PathLike, title: str = "") -> Path:
    """Teacher (left) and student (right) 20-NN top-1 against training minutes; each
    panel marks the raw-pixel baseline (dashed) and starts at the untrained network."""
    fig = new_figure(1200, 520)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, label in zip(
        axes, ("teacher_top1", "student_top1"), ("teacher", "student"), strict=True
    ):
        for run, style in zip(runs, run_styles(len(runs)), strict=True):
            minutes = [h["train_time_s"] / 60 for h in run.history]
            ax.plot(
                minutes, [h[key] for h in run.history], marker="o", ms=3, label=run.name, **style
            )
        pixels = [run.raw_pixels for run in runs if run.raw_pixels is not None]
        if pixels:
            ax.axhline(pixels[0], color="black", ls="--", lw=1, label="raw pixels")
        ax.set_title(f"{label}: 20-NN top-1 (%)", fontsize=10)
        ax.set_xlabel("training minutes (k-NN time excluded)")
        ax.grid(alpha=0.3)
    return _finish(fig, path, title, left=0.06, bottom=0.11, top=(0.93, 0.88))


def plot_signal_curves(runs: Sequence[RunCurve], path: str | os.PathLike, title: str = "") -> Path:
    """Teacher entropy, prototypes in use and KL against steps, each scaled by its
    uniform-start value, so runs with different ``out_dim`` share an axis: the figure that
    tells a run stuck at the uniform start from one that collapsed or one that learns."""
    fig = new_figure(1500, 460)
    axes = fig.subplots(1, len(SIGNAL_PANELS))
    for ax, (tag, label, scale) in zip(axes, SIGNAL_PANELS, strict=True):
        for run, style in zip(runs, run_styles(len(runs)), strict=True):
            points = (run.signals or {}).get(tag)
            if not points:
                continue
            k = float(run.args["out_dim"])
            divisor = math.log(k) if scale == "lnK" else k
            steps, values = zip(*points, strict=True)
            ax.plot(steps, [v / divisor for v in values], lw=1.2, label=run.name, **style)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    return _finish(fig, path, title, left=0.05, bottom=0.12, top=(0.92, 0.86))


def curves_data(runs: Sequence[RunCurve]) -> dict[str, Any]:
    """What ``knn_curves.json`` holds: each run whole (its row, flags, k-NN history and
    learning signals), so :func:`read_curves_file` gives the runs back, and the seed pools."""
    return {
        "runs": [
            {**run.summary(), "flags": run.args, "history": run.history, "signals": run.signals}
            for run in runs
        ],
        "seed_groups": seed_groups(runs),
    }


def write_curves(
    run_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike, title: str = ""
) -> dict[str, Path]:
    """Table (``knn_curves.md``), data (``knn_curves.json``), figure (``knn_curves.png``) and,
    where the runs have TensorBoard event files, their learning signals (``signals.png``).
    ``run_dirs`` may name earlier ``knn_curves.json`` files: their runs join as they were."""
    runs = read_runs(run_dirs)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    data = curves_data(runs)
    paths = {"table": out / "knn_curves.md", "json": out / "knn_curves.json"}
    for key, text in (("table", table + "\n"), ("json", json.dumps(data, indent=1) + "\n")):
        atomic_write(paths[key], lambda handle, text=text: handle.write(text.encode()))
    paths["figure"] = plot_knn_curves(runs, out / "knn_curves.png", title)
    if any(run.signals for run in runs):
        paths["signals"] = plot_signal_curves(runs, out / "signals.png", title)
    print(table, flush=True)
    return paths
