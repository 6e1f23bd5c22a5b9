"""The evaluators under real torchrun (2 gloo processes on the CPU) give one process's numbers.

A 1-block LocAtViT-T (patch 8, 32 px) on small Fashion-MNIST subsets keeps each launch to
seconds. The shard sizes are chosen so that one split divides evenly into batches (so
features are bit-identical) and the other does not (uneven shards, one short batch).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino_locat.distributed import shard_bounds
from dino_locat.evaluation.features import load_features
from dino_locat.models import build_backbone

REPO = Path(__file__).resolve().parents[1]
TINY = ["--num_workers", "0", "--batch_size_per_gpu", "8"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run(args: list[str], processes: int = 1, env: dict[str, str] | None = None):
    """One process (plain python) or ``processes`` ranks through torchrun."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += [
            "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        ]  # fmt: skip
    result = subprocess.run(
        [*launcher, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env or environment(),
    )
    if result.returncode != 0:
        raise AssertionError(f"{args} on {processes} failed:\n{result.stderr[-3000:]}")
    return result


def test_shards_cover_every_item_once_in_order():
    for total in (0, 1, 5, 21, 64):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(total, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "locatvit.pth"
    model = build_backbone("locatvit_t", img_size=32, patch_size=8, depth=1)
    torch.save(model.state_dict(), path)
    return path


def test_knn_under_torchrun_equals_one_process_and_reads_dino_dumps(weights, tmp_path):
    common = ["eval/knn.py", "--pretrained_weights", str(weights), "--train_subset", "64",
              "--test_subset", "21", "--nb_knn", "5", "20", *TINY]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run([*common, "--output_dir", str(one), "--dump_features", str(one / "features")])
    result = run(
        [*common, "--output_dir", str(two), "--dump_features", str(two / "features"),
         "--local_rank", "0", "--dist_url", "env://"],
        processes=2,
    )  # fmt: skip
    assert result.stdout.count("20-NN  top-1") == 1, "only rank 0 prints the results"
    assert result.stdout.count("--local_rank 0 ignored") == 1
    assert "2 processes (torchrun/env): extraction is sharded" in result.stdout
    assert "train features [rank 0/2: 32 items] done" in result.stdout
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    assert a["knn"] == b["knn"] and b["train_size"] == 64 and b["test_size"] == 21
    for split in ("train", "test"):
        fa, la, _ = load_features(one / "features" / f"{split}_features.pth")
        fb, lb, _ = load_features(two / "features" / f"{split}_features.pth")
        assert torch.equal(la, lb)
        if split == "train":  # 32 per rank = 4 full batches each, as one process batches them
            assert torch.equal(fa, fb)
        else:  # 10 + 11 images: other batch sizes, same numbers up to float rounding
            assert torch.allclose(fa, fb, rtol=0, atol=1e-5)
        # DINO's eval_knn.py --dump_features layout: four bare tensors
        (tmp_path / "dino").mkdir(exist_ok=True)
        torch.save(fa, tmp_path / "dino" / f"{split}feat.pth")
        torch.save(la, tmp_path / "dino" / f"{split}labels.pth")
    result = run(["eval/knn.py", "--load_features", str(tmp_path / "dino"), "--nb_knn", "5", "20"])
    assert "features dumped by DINO's eval_knn.py" in result.stdout
    dino = json.loads((tmp_path / "dino" / "eval_knn" / "results.json").read_text())
    assert dino["knn"] == a["knn"]


def test_linear_and_segmentation_under_torchrun_equal_one_process(weights, tmp_path):
    linear = ["eval/linear.py", "--pretrained_weights", str(weights), "--train_subset", "40",
              "--test_subset", "21", "--epochs", "2", "--lrs", "0.01", "0.3",
              "--n_last_blocks", "1", *TINY]  # fmt: skip
    seg = ["eval/segmentation.py", "--pretrained_weights", str(weights), "--train_scenes", "16",
           "--test_scenes", "5", "--canvas_size", "32", "--epochs", "1", *TINY]  # fmt: skip
    out = {}
    for processes in (1, 2):
        out[processes] = tmp_path / f"p{processes}"
        run([*linear, "--output_dir", str(out[processes] / "linear")], processes)
        run([*seg, "--output_dir", str(out[processes] / "seg")], processes)
    a, b = (json.loads((out[p] / "linear" / "results.json").read_text()) for p in (1, 2))
    for ra, rb in zip(a["heads_held_out"], b["heads_held_out"], strict=True):
        assert ra["name"] == rb["name"] and ra["epoch"] == rb["epoch"]
        assert ra["val_top1"] == pytest.approx(rb["val_top1"], abs=1e-9)
    assert a["headline"]["test_top1"] == pytest.approx(b["headline"]["test_top1"], abs=1e-9)
    a, b = (json.loads((out[p] / "seg" / "results.json").read_text()) for p in (1, 2))
    assert a["mIoU"] == pytest.approx(b["mIoU"], abs=1e-3)
    assert a["pixel_accuracy"] == pytest.approx(b["pixel_accuracy"], abs=1e-3)
    # --evaluate: the saved head, no training, under torchrun, gives the reported top-1.
    head = out[2] / "linear" / "linear_head.pth"
    run([*linear, "--output_dir", str(out[2] / "linear"), "--evaluate"], processes=2)
    again = json.loads((out[2] / "linear" / "evaluate" / "results.json").read_text())
    best = json.loads((out[2] / "linear" / "results.json").read_text())["headline"]
    assert again["head"] == best["name"] and again["head_file"] == str(head)
    assert again["top1"] == pytest.approx(best["test_top1"], abs=1e-9)


def test_hummingbird_under_torchrun_equals_one_process(weights, tmp_path):
    """Memory passes and queries sharded (5 + 5 training scenes, 2 + 3 queries), the memory
    streamed to both ranks in order; capped, so each image's patch choice is seeded too."""
    common = ["eval/hummingbird.py", "--pretrained_weights", str(weights), "--train_scenes", "10",
              "--test_scenes", "5", "--canvas_size", "32", "--augmentation_epochs", "2",
              "--memory_size", "200", *TINY[:2], "--batch_size_per_gpu", "4"]  # fmt: skip
    run([*common, "--output_dir", str(tmp_path / "one")])
    result = run([*common, "--output_dir", str(tmp_path / "two")], processes=2)
    assert result.stdout.count("Hummingbird mIoU") == 1, "only rank 0 prints the results"
    assert "memory pass 2/2 [rank 0/2: 5 items] done" in result.stdout
    assert "query patches [rank 0/2: 2 items] done" in result.stdout
    a, b = (json.loads((tmp_path / run_ / "results.json").read_text()) for run_ in ("one", "two"))
    assert a["memory"] == b["memory"] and a["memory"]["patches_per_image"] == 10
    assert a["mIoU"] == pytest.approx(b["mIoU"], abs=1e-3)
    assert a["pixel_accuracy"] == pytest.approx(b["pixel_accuracy"], abs=1e-3)
    assert a["per_class_iou"].keys() == b["per_class_iou"].keys()
    for name, iou in a["per_class_iou"].items():
        assert (iou is None) == (b["per_class_iou"][name] is None)
        assert iou is None or iou == pytest.approx(b["per_class_iou"][name], abs=1e-3)


def test_a_rank_that_never_comes_is_an_error_naming_the_rank_not_a_hang(weights, tmp_path):
    env = environment(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    env["MASTER_PORT"] = str(free_port())
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "eval/knn.py", "--pretrained_weights", str(weights), "--dist_timeout",
         "5", "--output_dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "rank 0 of 2 on node" in result.stderr
    assert "could not form the process group" in result.stderr
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "results.json").exists()
