"""Each checkout runs its own code, whatever other dino_locat is installed (dino_locat/checkout.py).

A copy of this checkout ("ours") is run from an unrelated folder by a Python that has another
clone ("theirs") installed with ``pip install -e`` (a real editable install into a virtual
environment). Theirs refuses to be imported, so any use of it fails loudly: the scripts, and the
jobs a launcher starts, must run ours, and say in one line that theirs was passed over. Deleting
theirs (an editable install left pointing at a removed clone) must not break ours either.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFUSE = 'raise ImportError("the other clone\'s dino_locat was imported")\n'


def copy_checkout(dest: Path, parts: tuple[str, ...]) -> Path:
    for part in parts:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / part)
    return dest


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_checkout(
        tmp_path_factory.mktemp("ours"), ("dino_locat", "eval", "launch", "pyproject.toml")
    )


@pytest.fixture
def theirs_installed(tmp_path: Path) -> tuple[Path, Path]:
    """(python, theirs): a virtual environment with this runner's packages (torch, ...) and
    theirs installed in editable mode; theirs' package raises on import."""
    theirs = copy_checkout(tmp_path / "theirs", ("dino_locat", "pyproject.toml"))
    (theirs / "dino_locat" / "__init__.py").write_text(REFUSE)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    runner_packages = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (Path(purelib) / "runner_packages.pth").write_text("\n".join(runner_packages) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
         "--no-index", "--no-build-isolation", "-e", theirs],
        check=True, capture_output=True, timeout=300, env=clean_env(),
    )  # fmt: skip
    return python, theirs


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without a PYTHONPATH that could name yet another copy."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run(argv: list, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(map(str, argv)),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(**env),
    )


def notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("note: running dino_locat")]


def test_installed_clone_is_refused_without_the_scripts_own_path(theirs_installed, tmp_path):
    python, _ = theirs_installed
    proc = run([python, "-c", "import dino_locat"], cwd=tmp_path)
    assert "the other clone's dino_locat was imported" in proc.stderr


def test_script_runs_its_own_checkout_and_says_which_it_passed_over(
    ours, theirs_installed, tmp_path
):
    python, theirs = theirs_installed
    proc = run([python, ours / "eval" / "knn.py", "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--pretrained_weights" in proc.stdout
    (line,) = notes(proc.stderr)
    assert f"from {ours / 'dino_locat'};" in line and str(theirs / "dino_locat") in line


def test_jobs_of_a_launcher_run_the_launchers_checkout(ours, theirs_installed, tmp_path):
    """A local submitit job starts a fresh Python in the folder the user is in: it must still
    import ours (the launcher hands its copy down through PYTHONPATH)."""
    python, _ = theirs_installed
    out = tmp_path / "knn"
    argv = [python, ours / "launch" / "eval.py", "knn", "--raw_pixels", "--image_size", "8",
            "--train_subset", "50", "--test_subset", "20", "--nb_knn", "5", "--num_workers",
            "0", "--output_dir", out, "--cluster", "local"]  # fmt: skip
    proc = run(argv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "other clone's dino_locat" not in proc.stdout + proc.stderr
    assert json.loads((out / "results.json").read_text())["knn"]["5"]["top1"] is not None


def test_a_deleted_installed_clone_does_not_break_the_scripts(ours, theirs_installed, tmp_path):
    python, theirs = theirs_installed
    shutil.rmtree(theirs)
    proc = run([python, ours / "launch" / "dino.py", "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--arch" in proc.stdout and notes(proc.stderr) == []


def test_module_run_from_a_checkout_runs_that_checkout(ours, tmp_path):
    """``python -m dino_locat.training`` in a checkout's root runs that checkout, even with
    another copy on PYTHONPATH, and says so."""
    theirs = copy_checkout(tmp_path / "theirs", ("dino_locat",))
    (theirs / "dino_locat" / "__init__.py").write_text(REFUSE)
    proc = run([sys.executable, "-m", "dino_locat.training", "--help"], cwd=ours,
               PYTHONPATH=str(theirs))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (line,) = notes(proc.stderr)
    assert str(theirs / "dino_locat") in line
