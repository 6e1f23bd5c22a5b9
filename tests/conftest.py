"""Shared fixtures: small real image files on disk (PNG and JPEG) in ImageFolder layout."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("circles", "stripes", "squares")


def draw_image(kind: int, seed: int, size: tuple[int, int] = (40, 36)) -> Image.Image:
    """A small RGB picture with class-dependent structure plus noise (not just noise)."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    if kind == 0:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (0.25 * min(size)) ** 2
    elif kind == 1:
        mask = ((xx + int(rng.integers(0, 8))) // 4) % 2 == 0
    else:
        mask = (np.abs(yy - cy) < 0.2 * height) & (np.abs(xx - cx) < 0.2 * width)
    color = rng.integers(60, 255, size=3)
    pixels = rng.integers(0, 50, size=(height, width, 3)) + mask[..., None] * color
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_image_folder(root: Path, per_class: int = 6) -> Path:
    """``root/<class>/<i>.png|.jpg``: alternating formats, different sizes per class."""
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = draw_image(label, seed=100 * label + i, size=(40 + 4 * label, 36))
            suffix = ".png" if i % 2 == 0 else ".jpg"
            image.save(folder / f"{i:03d}{suffix}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A fresh 3-class folder of 18 real PNG/JPEG files (6 per class)."""
    return write_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def shared_image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of folder, written once per session, for tests that only read it."""
    return write_image_folder(tmp_path_factory.mktemp("shared_images"))


def tiny_training_argv(output_dir: Path, data_path: Path | None = None, **flags) -> list[str]:
    """Flags for a seconds-long DINO run: 2-block LocAtViT-T, 32/16-px crops, K = 256.

    Without ``data_path`` it trains on the embedded Fashion-MNIST (``--subset`` images).
    ``flags`` override or add ``--name value`` pairs.
    """
    settings = {
        "arch": "locatvit_t",
        "depth": 2,
        "patch_size": 8,
        "global_crops_size": 32,
        "local_crops_size": 16,
        "local_crops_number": 2,
        "out_dim": 256,
        "batch_size_per_gpu": 4,
        "epochs": 1,
        "warmup_epochs": 0,
        "lr": 0.05,
        "momentum_teacher": 0.99,
        "num_workers": 0,
        "print_freq": 1,
        "vis_freq": 0,
        "subset": 0,
        "saveckp_freq": 0,
        "knn_freq": 0,
        "output_dir": output_dir,
        **flags,
    }
    if data_path is not None:
        settings["data_path"] = data_path
    argv: list[str] = []
    for name, value in settings.items():
        argv += [f"--{name}", str(value)]
    return argv


def one_thread_env() -> dict[str, str]:
    """The environment of a training subprocess in a test: one intra-op thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def kill_at_line(command: list[str], prefix: str) -> list[str]:
    """Run ``command`` and SIGKILL it as soon as it prints a line starting with ``prefix``
    (a crash at a known point); return the lines seen, and fail if it ended otherwise."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=one_thread_env()
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(prefix):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    return seen
