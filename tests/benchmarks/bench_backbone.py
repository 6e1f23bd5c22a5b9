"""Cost of LocAtViT over ViT in a DINO multi-crop student step (issue 2's benchmark).

One step = per image 2 global crops (224 px) + 8 local crops (96 px), each resolution group
through the backbone as in DINO, then backward of a loss on the CLS outputs; fp32. The two
models run interleaved in one process; we report the median over pairs of the time ratio
and of the peak-memory ratio.

Time and memory are measured in two interleaved passes. Time runs with glibc's malloc in
its steady state (blocks up to 32 MiB reused, where its dynamic threshold settles). Peak
memory on CPU is read from the kernel: the process's peak RSS (VmHWM) is reset before each
step (/proc/self/clear_refs) and read after it; the figure is the rise over the RSS just
before the step (parameters resident, gradients cleared). For that pass malloc is told
(mallopt) to hand every block over 64 KiB straight back to the system, so RSS follows the
tensors that are alive rather than malloc's caches.

With --compile, each model also runs with every block compiled (dino_locat.models.compile,
as ``--compile`` trains), side by side with its eager self; its compile time (first step
minus a compiled step) is printed apart from the step times.

Run: python tests/benchmarks/bench_backbone.py [--batch_sizes 4 8] [--pairs 5] [--threads 2]
     [--kernels ours dense] [--device cuda --amp] (on a GPU: time and torch.cuda peak-memory
     ratios, and the attention kernels each model launches) [--compile]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import statistics
import time

import torch
import torch.nn.functional as F

from dino_locat.models import build_backbone, vision_transformer
from dino_locat.models.compile import compile_blocks
from dino_locat.models.locality import dense_bias

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
    parser.add_argument(
        "--kernels",
        nargs="+",
        default=["ours"],
        choices=["ours", "dense"],
        help="LocAtViT training attention to compare: ours, and/or dense S through SDPA",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also each model with its blocks compiled"
    )
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


def dense_sdpa_attention(q, k, v, var, alpha, grid, clamp, eps, scale):
    """The straightforward alternative: materialise S and hand it to SDPA as attn_mask."""
    mask = dense_bias(var, alpha, grid, clamp, eps, q.shape[-2]).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


KERNELS = {"ours": vision_transformer.gaussian_biased_attention, "dense": dense_sdpa_attention}


def student_step_with(entry, crops, amp: bool) -> None:
    _, model, kernel = entry
    if kernel is not None:
        vision_transformer.gaussian_biased_attention = KERNELS[kernel]
    try:
        student_step(model, crops, amp)
    finally:
        vision_transformer.gaussian_biased_attention = KERNELS["ours"]


def timed_step(entry, crops, device: torch.device, amp: bool) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    student_step_with(entry, crops, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_of_step(entry, crops, meter: PeakMemory, amp: bool) -> int:
    meter.start()
    student_step_with(entry, crops, amp)
    return meter.stop()


def attention_kernels(entry, crops, amp: bool) -> list[str]:
    """Names of the CUDA attention kernels one step launches (which SDPA backend runs)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        student_step_with(entry, crops, amp)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    keys = ("flash", "fmha", "efficient", "attention", "cudnn")
    return sorted(n[:90] for n in names if any(k in n.lower() for k in keys))


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.amp and device.type != "cuda":
        raise SystemExit("--amp needs --device cuda")
    torch.manual_seed(0)
    vit = build_backbone(f"vit_{args.size}", drop_path_rate=0.1).to(device).train()
    locat = build_backbone(f"locatvit_{args.size}", drop_path_rate=0.1).to(device).train()
    entries = [("vit", vit, None)] + [
        (f"locatvit[{kernel}]", locat, kernel) for kernel in args.kernels
    ]
    if args.compile:
        compiled = {}
        for name, model in (("vit", vit), ("locatvit", locat)):
            compiled[name] = copy.deepcopy(model)
            compile_blocks(compiled[name])
        entries += [("vit+compile", compiled["vit"], None)]
        entries += [("locatvit[ours]+compile", compiled["locatvit"], "ours")]
    meter = PeakMemory(device)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"amp {args.amp}, arch *_{args.size}, crops 2x{args.global_size} + "
        f"{args.local_crops}x{args.local_size} per image; locatvit[ours] = dino_locat's "
        "bias-aware attention, locatvit[dense] = dense S as SDPA attn_mask"
    )
    for batch in args.batch_sizes:
        crops = [
            torch.randn(2 * batch, 3, args.global_size, args.global_size, device=device),
            torch.randn(
                args.local_crops * batch, 3, args.local_size, args.local_size, device=device
            ),
        ]
        if device.type == "cuda":
            for entry in entries:
                print(f"batch {batch:2d} {entry[0]} CUDA attention kernels:")
                for name in attention_kernels(entry, crops, args.amp):
                    print(f"    {name}")
        first_step = {
            entry[0]: timed_step(entry, crops, device, args.amp)
            for entry in entries
            if entry[0].endswith("+compile")
        }
        meter.exact_mode(True)
        peaks = {entry[0]: [] for entry in entries}
        for _ in range(args.pairs):
            for entry in entries:
                peaks[entry[0]].append(peak_of_step(entry, crops, meter, args.amp))
        meter.exact_mode(False)
        for _ in range(args.warmup):
            for entry in entries:
                student_step_with(entry, crops, args.amp)
        times = {entry[0]: [] for entry in entries}
        for _ in range(args.pairs):
            for entry in entries:
                times[entry[0]].append(timed_step(entry, crops, device, args.amp))
        for name in times:
            print(
                f"batch {batch:2d} {name:16s} step {statistics.median(times[name]) * 1000:8.1f} ms"
                f"  peak +{statistics.median(peaks[name]) / 2**20:8.1f} MiB"
            )
        for name, first in first_step.items():
            compile_s = first - statistics.median(times[name])
            print(
                f"batch {batch:2d} {name:16s} compile {compile_s:8.1f} s (first step {first:.1f} s)"
            )
        pairs = [(name, "vit") for name in list(times)[1:]]
        if args.compile:
            pairs += [
                ("locatvit[ours]+compile", "vit+compile"),
                ("vit+compile", "vit"),
                ("locatvit[ours]+compile", "locatvit[ours]"),
            ]
        for name, base in dict.fromkeys(pairs):
            time_ratio = statistics.median(
                a / b for a, b in zip(times[name], times[base], strict=True)
            )
            mem_ratio = statistics.median(
                a / b for a, b in zip(peaks[name], peaks[base], strict=True)
            )
            print(
                f"batch {batch:2d} ratio {name}/{base}: time {time_ratio:.3f}"
                f"  peak memory {mem_ratio:.3f}  (median of {args.pairs} interleaved rounds)"
            )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
