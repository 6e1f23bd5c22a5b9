"""CUDA sanity check for the backbones (run by hand on a GPU machine).

Prints, for locatvit_s on CUDA: the fast path against the attention-map path (fp32 and
fp16 autocast, outputs and gradients), whether a training forward/backward synchronises
with the host (torch.cuda sync debug mode set to error), and the peak memory of the GAug
bias forms. Then run bench_backbone.py --device cuda --amp for time/memory ratios.
"""

from __future__ import annotations

import torch

from dino_locat.models import build_backbone


def compare_paths(dtype_amp: bool) -> None:
    torch.manual_seed(0)
    model = build_backbone("locatvit_s", depth=2).cuda().train()
    attn = model.blocks[0].attn
    x = torch.randn(8, 197, 384, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.float16, enabled=dtype_amp):
        fast = attn(x, (14, 14))
        explicit, _ = attn(x, (14, 14), return_attention=True)
    g = torch.randn_like(fast)
    params = [x, *attn.parameters()]
    grads_fast = torch.autograd.grad(fast, params, g)
    grads_explicit = torch.autograd.grad(explicit, params, g)
    worst = max(
        ((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-12)).item()
        for a, b in zip(grads_fast, grads_explicit, strict=True)
    )
    diff = (fast.float() - explicit.float()).abs().max().item()
    print(
        f"amp={dtype_amp}: output max |fast - explicit| {diff:.2e}; "
        f"worst relative gradient difference {worst:.2e}"
    )


def no_host_sync() -> None:
    model = build_backbone("locatvit_s", drop_path_rate=0.1).cuda().train()
    crops = [torch.randn(4, 3, 224, 224, device="cuda"), torch.randn(16, 3, 96, 96, device="cuda")]
    model(crops[0]).sum().backward()  # warm-up outside the check (lazy CUDA init syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = sum(model(c).float().sum() for c in crops)
        loss.backward()
        print("training forward + backward: no host synchronisation (sync debug mode 'error')")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name())
    compare_paths(False)
    compare_paths(True)
    no_host_sync()


if __name__ == "__main__":
    main()
