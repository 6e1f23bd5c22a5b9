"""Cost of LocAtViT over ViT in a DINO multi-crop student step (issue 2's benchmark).

One step = per image 2 global crops (224 px) + 8 local crops (96 px), each resolution group
through the backbone as in DINO, then backward of a loss on the CLS outputs; fp32. The two
models run interleaved in one process; we report the median over pairs of the time ratio
and of the peak-memory ratio.

Time and memory are measured in two interleaved passes. Time runs under glibc's default
malloc (what users get). Peak memory on CPU is read from the kernel: the process's peak RSS
(VmHWM) is reset before each step (/proc/self/clear_refs) and read after it; the figure is
the rise over the RSS just before the step (parameters resident, gradients cleared). For
that pass malloc is told (mallopt) to hand every block over 64 KiB straight back to the
system, so RSS follows the tensors that are alive rather than malloc's caches.

Run: python tests/benchmarks/bench_backbone.py [--batch_sizes 4 8] [--pairs 5] [--threads 2]
     [--device cuda --amp] (on a GPU: time and torch.cuda peak-memory ratios)
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from dino_locat.models import build_backbone

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--pairs", type=int, default=5, help="interleaved (vit, locatvit) pairs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="s", choices=["t", "s", "b"])
    parser.add_argument("--global_size", type=int, default=224)
    parser.add_argument("--local_size", type=int, default=96)
    parser.add_argument("--local_crops", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="CUDA only: fp16 autocast")
    return parser


class PeakMemory:
    """Peak memory of one step: CUDA allocator stats, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def exact_mode(self, exact: bool) -> None:
        """CPU only. exact: blocks over 64 KiB go straight back to the OS when freed, so RSS
        tracks live tensors. Not exact: glibc's steady state (blocks up to 32 MiB reused)."""
        if self.libc is not None:
            self.libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024 if exact else 32 * 2**20)
            self.libc.mallopt(M_TRIM_THRESHOLD, 0 if exact else 128 * 2**20)
            self.libc.malloc_trim(0)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        self.base = self._status("VmRSS:")

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status("VmHWM:") - self.base


def student_step(model, crops, amp: bool) -> None:
    """DINO student: one backbone pass per crop resolution, then backward."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        outputs = [model(group) for group in crops]
        loss = sum(out.float().pow(2).mean() for out in outputs)
    loss.backward()


def timed_step(model, crops, device: torch.device, amp: bool) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    student_step(model, crops, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_of_step(model, crops, meter: PeakMemory, amp: bool) -> int:
    meter.start()
    student_step(model, crops, amp)
    return meter.stop()


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.amp and device.type != "cuda":
        raise SystemExit("--amp needs --device cuda")
    torch.manual_seed(0)
    models = {
        name: build_backbone(f"{name}_{args.size}", drop_path_rate=0.1).to(device).train()
        for name in ("vit", "locatvit")
    }
    meter = PeakMemory(device)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"amp {args.amp}, arch *_{args.size}, crops 2x{args.global_size} + "
        f"{args.local_crops}x{args.local_size} per image"
    )
    if device.type == "cuda":
        from torch.backends import cuda as cuda_backends

        print(
            "SDPA backends enabled: flash",
            cuda_backends.flash_sdp_enabled(),
            "mem-efficient",
            cuda_backends.mem_efficient_sdp_enabled(),
            "cudnn",
            cuda_backends.cudnn_sdp_enabled(),
            "| vit_* uses plain SDPA; locatvit_* training uses dino_locat's bias-aware attention",
        )
    for batch in args.batch_sizes:
        crops = [
            torch.randn(2 * batch, 3, args.global_size, args.global_size, device=device),
            torch.randn(
                args.local_crops * batch, 3, args.local_size, args.local_size, device=device
            ),
        ]
        meter.exact_mode(True)
        peaks = {name: [] for name in models}
        for _ in range(args.pairs):
            for name, model in models.items():
                peaks[name].append(peak_of_step(model, crops, meter, args.amp))
        meter.exact_mode(False)
        for _ in range(args.warmup):
            for model in models.values():
                student_step(model, crops, args.amp)
        times = {name: [] for name in models}
        for _ in range(args.pairs):
            for name, model in models.items():
                times[name].append(timed_step(model, crops, device, args.amp))
        time_ratio = statistics.median(
            loc / vit for loc, vit in zip(times["locatvit"], times["vit"], strict=True)
        )
        mem_ratio = statistics.median(
            loc / vit for loc, vit in zip(peaks["locatvit"], peaks["vit"], strict=True)
        )
        for name in models:
            print(
                f"batch {batch:2d} {name:9s} step {statistics.median(times[name]) * 1000:8.1f} ms"
                f"  peak +{statistics.median(peaks[name]) / 2**20:8.1f} MiB"
            )
        print(
            f"batch {batch:2d} ratio locatvit/vit: time {time_ratio:.3f}"
            f"  peak memory {mem_ratio:.3f}"
            f"  (median of {args.pairs} interleaved pairs)"
        )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
