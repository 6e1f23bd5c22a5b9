"""The study's report: one record per network x evaluation, the summary per metric and arch
(mean and spread over seeds, the difference to the first arch, tie or not), written as
results.json, then table.md and study.png drawn from that file.

Paths in results.json are relative to the folder that holds it (older studies wrote absolute
paths: :class:`StudyResults` reads both), so a study folder can be moved or copied and still
be read, and its table and figure drawn again (:func:`render`).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dino_locat.checkout import code_version
from dino_locat.checkpoint import checkpoint_args, load_checkpoint
from dino_locat.evaluation.report import write_json_atomic
from dino_locat.files import atomic_write
from dino_locat.launching.study.plan import Piece, study_relative
from dino_locat.seeds import mean_std
from dino_locat.visualization.study import MetricPanel, OnlineCurve, study_figure
from dino_locat.visualization.trends import GaugTrends, trends_from_tensorboard

# what an evaluation's parent piece makes of the network it evaluates
NETWORKS = {"train": "trained", "untrained": "untrained"}
# metric -> (evaluator, keys into its results.json, label)
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "knn_top1": ("knn", ("knn", "20", "top1"), "k-NN 20-NN top-1 (%)"),
    "linear_top1": ("linear", ("headline", "test_top1"), "linear top-1 (%), held-out selection"),
    "segmentation_miou": ("segmentation", ("mIoU",), "frozen segmentation mIoU (%)"),
    "hummingbird_miou": ("hummingbird", ("mIoU",), "Hummingbird mIoU (%)"),
}


def _metric(results: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    value: Any = results
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return None if value is None else float(value)


def collect(pieces: list[Piece]) -> list[dict[str, Any]]:
    """One record per network x evaluation that finished, with its flags and code version.

    The training flags are those the run used, as its checkpoint stores them (training turns
    ``use_fp16`` off on CPU, for one), with its folder as ``output_dir``; paths inside the
    study folder are relative to it.
    """
    records = []
    used: dict[Path, dict[str, Any]] = {}  # each network's checkpoint is read once
    for piece in pieces:
        if piece.kind != "eval" or not piece.done():
            continue
        results_file = piece.folder / "results.json"
        results = json.loads(results_file.read_text())
        submitted = json.loads(piece.record_path.read_text())
        parent = piece.parent
        training_flags = None
        if parent is not None:
            if parent.checkpoint not in used:
                used[parent.checkpoint] = checkpoint_args(load_checkpoint(parent.checkpoint))
            # output_dir: where the run is now (the folder may have moved since it trained)
            flags = {**used[parent.checkpoint], "output_dir": str(parent.folder)}
            training_flags = study_relative(flags, piece.root)
        record = {
            "network": "raw_pixels" if parent is None else NETWORKS[parent.kind],
            "arch": piece.arch,
            "seed": piece.seed,
            "evaluation": piece.evaluator,
            "metrics": {
                name: _metric(results, keys)
                for name, (evaluator, keys, _) in METRICS.items()
                if evaluator == piece.evaluator
            },
            "results_file": study_relative(str(results_file), piece.root),
            "evaluation_flags": study_relative(submitted["flags"], piece.root),
            "training_flags": training_flags,
            "code_version": submitted["code_version"],
        }
        records.append(record)
    return records


TIE_RULE = (
    "better or worse only when every seed of one arch lies beyond every seed of the other "
    "and the gap between the means exceeds twice the larger spread (sample std over seeds); "
    "otherwise a tie, with the seeds per arch that would resolve a gap of that size (80% "
    "power at the 5% level, two-sided, from the larger spread)"
)
# (z_0.975 + z_0.8)^2: the two-sample sample size for a gap of d with spread s is
# 2 * POWER_FACTOR * s^2 / d^2 seeds per arch.
POWER_FACTOR = (1.959964 + 0.841621) ** 2


def verdict(first: list[float], other: list[float]) -> tuple[str, int | None]:
    """How ``other``'s seeds compare with ``first``'s under :data:`TIE_RULE`, and for a tie
    the seeds per arch that would settle it (None when no estimate can be made).

    Two seeds give a spread that is itself noisy, hence the demand for both a clean
    separation and a gap of twice the spread before a difference is called.
    """
    (first_mean, first_std), (other_mean, other_std) = mean_std(first), mean_std(other)
    spreads = [s for s in (first_std, other_std) if s is not None]
    if not spreads:
        return "no spread (one seed)", None
    gap = other_mean - first_mean
    spread = max(spreads)
    if gap > 2 * spread and min(other) > max(first):
        return "better", None
    if -gap > 2 * spread and max(other) < min(first):
        return "worse", None
    if gap == 0:
        return "tie", None
    needed = math.ceil(2 * POWER_FACTOR * spread**2 / gap**2)
    return "tie", max(needed, max(len(first), len(other)) + 1)


def summarize(records: list[dict[str, Any]], archs: list[str]) -> list[dict[str, Any]]:
    """Per metric and arch: mean, spread (sample std over seeds), the untrained value; and
    each arch's difference to the first with its :func:`verdict`."""
    rows = []
    for metric, (_, _, label) in METRICS.items():

        def by_seed(network: str, arch: str | None, metric: str = metric) -> dict[int, float]:
            return {
                r["seed"]: r["metrics"][metric]
                for r in records
                if r["network"] == network
                and r["arch"] == arch
                and r["metrics"].get(metric) is not None
            }

        per_arch = {}
        for arch in archs:
            trained = list(by_seed("trained", arch).values())
            untrained = list(by_seed("untrained", arch).values())
            mean, std = mean_std(trained) if trained else (None, None)
            own = by_seed("untrained", arch)
            per_arch[arch] = {
                "seeds": len(trained),
                "mean": mean,
                "std": std,
                "values": trained,
                # several untrained seeds (a combined study): their mean
                "untrained": mean_std(untrained)[0] if untrained else None,
                "untrained_values": untrained,
                # each trained seed against the untrained network of its own seed
                "gain_over_own_untrained": {
                    str(seed): value - own[seed]
                    for seed, value in by_seed("trained", arch).items()
                    if seed in own
                },
            }
        if all(v["mean"] is None for v in per_arch.values()):
            continue
        first = per_arch[archs[0]]
        for arch in archs[1:]:
            entry = per_arch[arch]
            if entry["mean"] is None or first["mean"] is None:
                continue
            entry["difference"] = entry["mean"] - first["mean"]
            entry["verdict"], entry["seeds_to_settle"] = verdict(first["values"], entry["values"])
        pixels = list(by_seed("raw_pixels", None).values())
        rows.append(
            {
                "metric": metric,
                "label": label,
                "archs": per_arch,
                "raw_pixels": pixels[0] if pixels else None,
            }
        )
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(rows: list[dict[str, Any]], archs: list[str]) -> str:
    """A Markdown table: mean ± spread (n seeds) per arch, untrained, raw pixels, difference."""
    head = [
        "metric",
        *[f"{a} mean ± std (n)" for a in archs],
        *[f"{a} untrained" for a in archs],
        "raw pixels",
        *[f"{a} − {archs[0]}" for a in archs[1:]],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"]]
        for arch in archs:
            entry = row["archs"][arch]
            cells.append(f"{_fmt(entry['mean'])} ± {_fmt(entry['std'])} ({entry['seeds']})")
        cells += [_fmt(row["archs"][arch]["untrained"]) for arch in archs]
        cells.append(_fmt(row["raw_pixels"]))
        for arch in archs[1:]:
            entry = row["archs"][arch]
            diff = entry.get("difference")
            if diff is None:  # an arch without this metric (a piece failed or did not run)
                cells.append("-")
                continue
            settle = entry.get("seeds_to_settle")
            call = entry["verdict"] + (f"; ~{settle} seeds per arch to settle" if settle else "")
            cells.append(f"{diff:+.2f} ({call})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class StudyResults:
    """A study's results.json, read where it lies now."""

    path: Path
    data: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.path.parent

    def locate(self, recorded: str) -> Path:
        """Where a path that results.json records is now: relative to the folder holding it.
        Older files recorded absolute paths; those inside the study folder as it was then
        (where its figure was written) are taken relative to it too."""
        path = Path(recorded)
        if not path.is_absolute():
            return self.folder / path
        old_root = Path(self.data["figure"]).parent
        return self.folder / path.relative_to(old_root) if path.is_relative_to(old_root) else path

    def curves(self) -> list[tuple[OnlineCurve | None, str, GaugTrends | None]]:
        """Per training run, its online k-NN curve and GAug trends (None where it has none):
        from results.json where it holds them, else read from the run folder (older files)."""
        entries = self.data.get("runs")
        if entries is None or any("online_knn" not in e for e in entries):
            entries = [run_record(a, s, f, self.folder) for a, s, f in self.runs()]
        found = []
        for entry in entries:
            arch, seed, history = entry["arch"], entry["seed"], entry["online_knn"]
            curve = None
            if history:
                epochs = [h["epoch"] for h in history]
                curve = OnlineCurve(arch, seed, epochs, [h["teacher_top1"] for h in history])
            gaug = entry["gaug"] and GaugTrends.from_json(entry["gaug"])
            found.append((curve, f"{arch} seed {seed}", gaug))
        return found

    def runs(self) -> list[tuple[str, int, Path]]:
        """(arch, seed, run folder) of every training run (older files: of every run with a
        finished evaluation)."""
        if "runs" in self.data:
            return [(r["arch"], r["seed"], self.locate(r["folder"])) for r in self.data["runs"]]
        found: dict[tuple[str, int, Path], None] = {}
        for record in self.data["records"]:
            if record["network"] == "trained":
                folder = self.locate(record["training_flags"]["output_dir"])
                found[(record["arch"], record["seed"], folder)] = None
        return list(found)


# GAug trends kept per run in results.json: enough points to draw, few enough to stay small
GAUG_POINTS = 120


def run_record(arch: str, seed: int, folder: Path, root: Path) -> dict[str, Any]:
    """One training run as results.json keeps it: where it is, and what the figure draws of
    it (the online k-NN history from its checkpoint, the GAug trends from its event files),
    so that results.json alone redraws the figure, moved, copied or combined."""
    checkpoint = folder / "checkpoint.pth"
    online = (load_checkpoint(checkpoint).get("online_knn") or {}) if checkpoint.is_file() else {}
    history = [
        {k: h.get(k) for k in ("epoch", "teacher_top1", "student_top1")}
        for h in online.get("history") or []
    ]
    folder_name = study_relative(str(folder), root)
    try:
        gaug = trends_from_tensorboard(folder).to_json(GAUG_POINTS)
    except FileNotFoundError:
        gaug = None  # a backbone without GAug (ViT) logs no per-block scalars
    else:
        gaug["source"] = f"TensorBoard scalars in {folder_name}"
    return {"arch": arch, "seed": seed, "folder": folder_name, "online_knn": history, "gaug": gaug}


def read_results(path: str | Path) -> StudyResults:
    """Read a study's results.json (this version's or an older one)."""
    path = Path(path).resolve()
    return StudyResults(path, json.loads(path.read_text()))


def _figure(results: StudyResults, path: Path) -> Path:
    archs = results.data["archs"]
    panels = []
    for row in results.data["summary"]:
        references = {
            f"{a} untrained": row["archs"][a]["untrained"]
            for a in archs
            if row["archs"][a]["untrained"] is not None
        }
        if row["raw_pixels"] is not None:
            references["raw pixels"] = row["raw_pixels"]
        per_arch = {a: row["archs"][a]["values"] for a in archs}
        panels.append(MetricPanel(row["label"], per_arch, references))
    curves, trends = [], {}
    for curve, name, gaug in results.curves():
        if curve is not None:
            curves.append(curve)
        if gaug is not None:
            trends[name] = gaug
    title = (
        f"Does locality help under DINO? {', '.join(archs)}; bars: mean over seeds, dots: "
        "seeds, dashed: baselines"
    )
    return study_figure(panels, curves, trends, archs, path, title)


def render(results: StudyResults) -> tuple[str, Path]:
    """Write table.md and study.png beside a study's results.json, drawn from it (the online
    k-NN curves and GAug trends from the run folders it names, where they are); returns the
    table and the figure's path."""
    table = format_table(results.data["summary"], results.data["archs"])
    atomic_write(results.folder / "table.md", lambda handle: handle.write((table + "\n").encode()))
    return table, _figure(results, results.folder / "study.png")


def write_report(
    out: Path,
    archs: list[str],
    budget: str,
    records: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    failed: list[str],
    **extra: Any,
) -> dict[str, Any]:
    """The one layout of a study's results.json: write it under ``out`` with the summary
    drawn from ``records``, then the table and figure from it; print the table."""
    summary = {
        "study": "does locality help under DINO?",
        "archs": archs,
        "budget": budget,
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "code_version": code_version(),
        **extra,
        "tie_rule": TIE_RULE,
        "summary": summarize(records, archs),
        "records": records,
        "runs": runs,
        "failed": failed,
        "figure": "study.png",
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", summary)
    table, figure = render(read_results(out / "results.json"))
    print(table, flush=True)
    print(f"[study] results: {out / 'results.json'}, figure: {figure}", flush=True)
    return summary


def report(args: argparse.Namespace, pieces: list[Piece], failed: list[str]) -> dict[str, Any]:
    """Write results.json under --output_dir, then the table and figure from it; print the
    table."""
    out = Path(args.output_dir).resolve()
    runs = [
        run_record(p.arch, p.seed, p.folder, out)
        for p in pieces
        if p.kind == "train" and p.checkpoint.is_file()
    ]
    summary = write_report(out, args.archs, args.budget, collect(pieces), runs, failed)
    if failed:
        print(f"[study] failed or not run: {', '.join(failed)}", file=sys.stderr, flush=True)
    return summary
