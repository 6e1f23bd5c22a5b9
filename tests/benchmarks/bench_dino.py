"""Throughput of DINO pretraining at the embedded Fashion-MNIST preset (issue 3's benchmark).

1. The multi-crop data pipeline alone: real Fashion-MNIST images through the preset's
   augmentation (2 x 32 px + 4 x 16 px views) and a DataLoader with 0, 1 and 2 workers;
   images/s over the timed batches (worker start-up reported separately).
2. The whole training step (teacher forward, student forward/backward, clipping, AdamW,
   EMA) of DinoTrainer.train_step, for locatvit_s and vit_s, interleaved in one process,
   on pre-loaded batches; images/s and the LocAtViT / ViT time ratio.

Run: python tests/benchmarks/bench_dino.py [--steps 4] [--batches 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from dino_locat.data.folders import build_pretraining_dataset
from dino_locat.data.multicrop import EpochSampler, MultiCropDataset
from dino_locat.data.transforms import MultiCropAugmentation
from dino_locat.distributed import DistEnv
from dino_locat.training import get_args_parser as training_parser
from dino_locat.training.args import resolve_args
from dino_locat.training.loop import DinoTrainer


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per arch")
    parser.add_argument("--batches", type=int, default=8, help="timed loader batches per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--archs", nargs="+", default=["locatvit_s", "vit_s"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    return parser


def preset_args(arch: str, output_dir: str) -> argparse.Namespace:
    argv = ["--arch", arch, "--output_dir", output_dir, "--vis_freq", "0"]
    return resolve_args(training_parser().parse_args(argv))[0]


def bench_pipeline(args: argparse.Namespace, workers: int, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the next ``batches`` batches)."""
    images, _ = build_pretraining_dataset(None, args.subset)
    augment = MultiCropAugmentation.from_args(args)
    dataset = MultiCropDataset(images, augment, seed=0)
    sampler = EpochSampler(dataset, 1, 0, seed=0)
    loader = DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, num_workers=workers
    )
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    return first, batches * args.batch_size_per_gpu / elapsed


def main(bench: argparse.Namespace) -> None:
    if bench.threads:
        torch.set_num_threads(bench.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = preset_args(bench.archs[0], tmp)
        print(
            f"Embedded preset: batch {base.batch_size_per_gpu}, 2x{base.global_crops_size}px + "
            f"{base.local_crops_number}x{base.local_crops_size}px views, patch {base.patch_size}, "
            f"out_dim {base.out_dim}; torch threads {torch.get_num_threads()}"
        )
        print("\n[1] multi-crop data pipeline (real Fashion-MNIST images)")
        for workers in bench.workers:
            first, rate = bench_pipeline(base, workers, bench.batches)
            print(
                f"  num_workers={workers}: {rate:8.1f} images/s  (first batch after {first:.2f} s)"
            )

        print("\n[2] full training step (DinoTrainer.train_step, fp32 CPU)")
        trainers = {}
        for arch in bench.archs:
            trainers[arch] = DinoTrainer(
                preset_args(arch, f"{tmp}/{arch}"), DistEnv(), torch.device("cpu")
            )
        loader = iter(trainers[bench.archs[0]].loader)
        batch = next(loader)[0]
        times: dict[str, list[float]] = {arch: [] for arch in bench.archs}
        for step in range(bench.steps + 1):  # step 0 warms up every arch
            for arch, trainer in trainers.items():
                trainer.student_step.train()
                start = time.perf_counter()
                loss = trainer.train_step(batch, epoch=1, step=trainer.niter + step, record=False)
                loss.item()
                if step:
                    times[arch].append(time.perf_counter() - start)
        size = base.batch_size_per_gpu
        for arch, values in times.items():
            median = statistics.median(values)
            print(
                f"  {arch:<11} {median:6.2f} s/step  {size / median:7.1f} images/s  "
                f"(median of {len(values)}; min {min(values):.2f} s)"
            )
        if len(bench.archs) == 2:
            a, b = bench.archs
            ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
            print(f"  time ratio {a} / {b}: {statistics.median(ratios):.3f} (median of pairs)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
