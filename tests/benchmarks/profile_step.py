"""Where the time of one multi-crop student step goes (torch.profiler, top operators).

Run: python tests/benchmarks/profile_step.py --arch locatvit_s [--device cuda --amp]
     [--batch 4] [--kernel ours|dense]
"""

from __future__ import annotations

import argparse

import torch
from bench_backbone import KERNELS, student_step
from torch.profiler import ProfilerActivity, profile

from dino_locat.models import build_backbone, vision_transformer


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="locatvit_s")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernel", default="ours", choices=sorted(KERNELS))
    parser.add_argument("--rows", type=int, default=20)
    return parser


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    vision_transformer.gaussian_biased_attention = KERNELS[args.kernel]
    device = torch.device(args.device)
    model = build_backbone(args.arch, drop_path_rate=0.1).to(device).train()
    crops = [
        torch.randn(2 * args.batch, 3, 224, 224, device=device),
        torch.randn(8 * args.batch, 3, 96, 96, device=device),
    ]
    for _ in range(2):
        student_step(model, crops, args.amp)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        student_step(model, crops, args.amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
