"""k-NN search at ImageNet scale: time and peak memory of our faiss path vs. a torch reference.

An ImageNet-sized bank (1,281,167 x 384 float32, ~1.97 GB, L2-normalised random rows) and
10,000 queries, k = 200. Each method runs in its own subprocess, so its peak resident
memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own; both report seconds,
and the parent prints them side by side, with how many neighbour lists agree.

- ``faiss``: ``dino_locat.evaluation.knn.nearest_neighbors`` (IndexFlatIP over bank slices,
  queries in batches, heap merge) + ``weighted_vote``: what ``eval/knn.py`` runs.
- ``torch``: chunked ``queries @ bank_chunk.T`` with a running top-k merge (reference).

Target: peak RSS of the faiss path <= 4 GB (GB = 1e9 bytes throughout). Run by hand; it
takes about five minutes on 2 cores:
    python tests/benchmarks/bench_knn.py [--rows N --queries Q --dim D --k K]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

GENERATE_ROWS = 65536
LIMIT_GB = 4.0


def peak_rss_gb() -> float:
    """Peak resident set of this process so far, in GB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def random_unit_rows(rows: int, dim: int, seed: int) -> torch.Tensor:
    """(rows, dim) float32 unit vectors, generated chunk by chunk in place (no 2x copy)."""
    out = torch.empty(rows, dim)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, rows, GENERATE_ROWS):
        chunk = out[start : start + GENERATE_ROWS]
        chunk.normal_(generator=generator)
        chunk.div_(chunk.norm(dim=1, keepdim=True))
    return out


def torch_reference(
    bank: torch.Tensor, queries: torch.Tensor, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by chunked matmul, merging each chunk's top-k into a running top-k."""
    all_sims, all_ids = [], []
    for q0 in range(0, len(queries), 1000):
        q = queries[q0 : q0 + 1000]
        best_sims = torch.empty(len(q), 0)
        best_ids = torch.empty(len(q), 0, dtype=torch.long)
        for b0 in range(0, len(bank), GENERATE_ROWS):
            sims = q @ bank[b0 : b0 + GENERATE_ROWS].T
            top_sims, top_ids = sims.topk(min(k, sims.shape[1]), dim=1)
            merged_sims = torch.cat([best_sims, top_sims], dim=1)
            merged_ids = torch.cat([best_ids, top_ids + b0], dim=1)
            best_sims, order = merged_sims.topk(min(k, merged_sims.shape[1]), dim=1)
            best_ids = merged_ids.gather(1, order)
        all_sims.append(best_sims)
        all_ids.append(best_ids)
    return torch.cat(all_sims).numpy(), torch.cat(all_ids).numpy()


def child(args: argparse.Namespace) -> None:
    from dino_locat.evaluation.knn import nearest_neighbors, weighted_vote

    start = time.perf_counter()
    bank = random_unit_rows(args.rows, args.dim, seed=0)
    queries = random_unit_rows(args.queries, args.dim, seed=1)
    labels = torch.randint(
        0, args.classes, (args.rows,), generator=torch.Generator().manual_seed(2)
    )
    generate_s = time.perf_counter() - start
    rss_data = peak_rss_gb()
    start = time.perf_counter()
    if args.child == "faiss":
        sims, ids = nearest_neighbors(bank, queries, args.k)
    else:
        sims, ids = torch_reference(bank, queries, args.k)
    search_s = time.perf_counter() - start
    start = time.perf_counter()
    ids_t = torch.from_numpy(ids)
    scores = weighted_vote(torch.from_numpy(sims), labels[ids_t], args.classes, 0.07)
    vote_s = time.perf_counter() - start
    np.save(args.ids_out, ids)
    print(
        json.dumps(
            {
                "method": args.child,
                "generate_s": generate_s,
                "search_s": search_s,
                "vote_s": vote_s,
                "peak_rss_gb": peak_rss_gb(),
                "rss_after_data_gb": rss_data,
                "bank_gb": bank.numel() * 4 / 1e9,
                "predictions_sum": int(scores.argmax(1).sum()),
            }
        )
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--child", choices=["faiss", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--ids_out", help=argparse.SUPPRESS)
    return parser


def main(args: argparse.Namespace) -> None:
    if args.child:
        child(args)
        return
    print(
        f"bank {args.rows} x {args.dim} float32 ({args.rows * args.dim * 4 / 1e9:.2f} GB), "
        f"{args.queries} queries, k={args.k}; {torch.get_num_threads()} torch threads",
        flush=True,
    )
    reports, ids = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("faiss", "torch"):
            out = Path(tmp) / f"{method}.npy"
            flags = [
                f"--{k}={getattr(args, k)}" for k in ("rows", "dim", "queries", "k", "classes")
            ]
            result = subprocess.run(
                [sys.executable, __file__, *flags, f"--child={method}", f"--ids_out={out}"],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                sys.exit(f"{method} run failed:\n{result.stderr[-2000:]}")
            reports[method] = json.loads(result.stdout.strip().splitlines()[-1])
            ids[method] = np.load(out)
            print(f"{method}: done", flush=True)
    print(f"\n{'method':<8}{'search s':>10}{'vote s':>9}{'peak RSS GB':>13}{'RSS after data':>16}")
    for method, r in reports.items():
        print(
            f"{method:<8}{r['search_s']:>10.1f}{r['vote_s']:>9.2f}{r['peak_rss_gb']:>13.2f}"
            f"{r['rss_after_data_gb']:>16.2f}"
        )
    faiss_r, torch_r = reports["faiss"], reports["torch"]
    same_lists = float((ids["faiss"] == ids["torch"]).all(axis=1).mean())
    same_sets = float(
        np.mean(
            [
                len(np.intersect1d(a, b)) / args.k
                for a, b in zip(ids["faiss"][:500], ids["torch"][:500], strict=True)
            ]
        )
    )
    print(f"\nsearch time faiss / torch: {faiss_r['search_s'] / torch_r['search_s']:.2f}")
    print(f"peak RSS faiss / torch:    {faiss_r['peak_rss_gb'] / torch_r['peak_rss_gb']:.2f}")
    print(
        f"bank itself: {faiss_r['bank_gb']:.2f} GB; identical neighbour lists: "
        f"{100 * same_lists:.2f}%, neighbour-set overlap (500 queries): {100 * same_sets:.2f}%"
    )
    print(f"same predictions checksum: {faiss_r['predictions_sum'] == torch_r['predictions_sum']}")
    ok = faiss_r["peak_rss_gb"] <= LIMIT_GB
    verdict = f"<= {LIMIT_GB} GB: PASS" if ok else f"> {LIMIT_GB} GB: FAIL"
    print(f"faiss peak RSS {faiss_r['peak_rss_gb']:.2f} GB {verdict}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
