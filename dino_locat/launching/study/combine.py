"""One report from parts of a study run apart: the same study split by seed over machines or
sessions (``--seeds 0`` here, ``--seeds 1`` there), combined into one results.json, table and
figure as if one command had run every piece.

Every piece of a study is an independent, seeded job, so a piece's result does not depend on
which command ran it; what makes the parts one study is that they trained and evaluated with
the same flags. That is checked here, flag by flag, before anything is written: parts whose
runs differ in anything but the arch, the seed and the folder are refused, naming the flag.
A network evaluated in two parts (raw pixels, an untrained network) must read the same in
both, and is kept once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dino_locat.errors import InputError
from dino_locat.launching.study.plan import study_relative
from dino_locat.launching.study.report import (
    StudyResults,
    read_results,
    run_record,
    write_report,
)

# Flags that differ between the runs of one study by design.
OWN_TRAINING = {"arch", "seed", "output_dir"}
OWN_EVALUATION = {"pretrained_weights", "output_dir"}


def _rehome(part: StudyResults, value: str | None, out: Path) -> str | None:
    """A path recorded in ``part``, as the combined results.json records it (relative to
    ``out`` when inside it, else absolute)."""
    return None if value is None else study_relative(str(part.locate(value)), out)


def _shared(flags: dict[str, Any], own: set[str]) -> dict[str, Any]:
    return {k: v for k, v in flags.items() if k not in own}


def _check_same(
    kind: str, reference: tuple[str, dict[str, Any]], other: tuple[str, dict[str, Any]]
) -> None:
    """Refuse two parts whose ``kind`` flags differ, naming the first flag that does."""
    (first_name, first), (other_name, flags) = reference, other
    for key in sorted(set(first) | set(flags)):
        if first.get(key) != flags.get(key):
            raise InputError(
                f"--combine: {other_name} has {kind} flag {key}={flags.get(key)!r} where "
                f"{first_name} has {key}={first.get(key)!r}: these parts are not one study"
            )


class _SameFlags:
    """The first training flags and the first flags of each evaluator (on networks, on raw
    pixels) seen; every later record must match them."""

    def __init__(self) -> None:
        self.training: tuple[str, dict[str, Any]] | None = None
        self.evaluation: dict[tuple[str, bool], tuple[str, dict[str, Any]]] = {}

    def check(self, name: str, record: dict[str, Any]) -> None:
        label = f"{name} ({record['network']} {record['arch'] or ''} seed {record['seed']})"
        if record["training_flags"] is not None:
            flags = (label, _shared(record["training_flags"], OWN_TRAINING))
            self.training = self.training or flags
            _check_same("training", self.training, flags)
        group = (record["evaluation"], record["network"] == "raw_pixels")
        flags = (label, _shared(record["evaluation_flags"], OWN_EVALUATION))
        reference = self.evaluation.setdefault(group, flags)
        _check_same(f"{record['evaluation']} evaluation", reference, flags)


def _rehomed_record(part: StudyResults, record: dict[str, Any], out: Path) -> dict[str, Any]:
    """``record`` with its paths as the combined results.json under ``out`` records them."""
    eval_flags = dict(record["evaluation_flags"])
    for path_flag in OWN_EVALUATION:
        eval_flags[path_flag] = _rehome(part, eval_flags.get(path_flag), out)
    rehomed = {
        **record,
        "results_file": _rehome(part, record["results_file"], out),
        "evaluation_flags": eval_flags,
    }
    if record["training_flags"] is not None:
        folder = _rehome(part, record["training_flags"]["output_dir"], out)
        rehomed["training_flags"] = {**record["training_flags"], "output_dir": folder}
    return rehomed


def _run_records(part: StudyResults, out: Path) -> list[dict[str, Any]]:
    """The part's training runs with their curves (older results.json: read from the run
    folders where they still are), folders as the combined results.json records them."""
    entries = part.data.get("runs") or [
        {"arch": arch, "seed": seed, "folder": str(path)} for arch, seed, path in part.runs()
    ]
    found = []
    for entry in entries:
        folder = part.locate(entry["folder"])
        if "online_knn" not in entry:
            entry = run_record(entry["arch"], entry["seed"], folder, out)
        found.append({**entry, "folder": study_relative(str(folder), out)})
    return found


def combine_studies(files: list[str], output_dir: str) -> dict[str, Any]:
    """Write results.json, table.md and study.png under ``output_dir`` from the results.json
    of several parts of one study; print the table and return the combined summary."""
    if len(files) < 2:
        raise InputError("--combine: give the results.json of at least two parts")
    for name in files:
        if not Path(name).is_file():
            raise InputError(f"--combine: {name} does not exist (a study's results.json)")
    parts = [read_results(name) for name in files]
    out = Path(output_dir).resolve()
    archs = parts[0].data["archs"]
    same = _SameFlags()
    records: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for part, name in zip(parts, files, strict=True):
        if part.data["archs"] != archs:
            raise InputError(
                f"--combine: {name} compares {part.data['archs']}, {files[0]} compares {archs}"
            )
        for record in part.data["records"]:
            same.check(name, record)
            key = (record["network"], record["arch"], record["seed"], record["evaluation"])
            if key not in records:
                records[key] = (name, _rehomed_record(part, record, out))
            elif records[key][1]["metrics"] != record["metrics"]:
                raise InputError(
                    f"--combine: {name} and {records[key][0]} both evaluated {key} and read "
                    f"{record['metrics']} against {records[key][1]['metrics']}"
                )
        for entry in _run_records(part, out):
            runs.setdefault((entry["arch"], entry["seed"]), entry)
    combined_from = [
        {
            "results": study_relative(str(Path(n).resolve()), out),
            "command": p.data["command"],
            "code_version": p.data["code_version"],
        }
        for p, n in zip(parts, files, strict=True)
    ]
    failed = [f for p in parts for f in p.data.get("failed", [])]
    kept = [record for _, record in records.values()]
    budget = parts[0].data["budget"]
    combined = write_report(
        out, archs, budget, kept, list(runs.values()), failed, combined_from=combined_from
    )
    print(f"[study] combined {len(parts)} parts", flush=True)
    return combined
