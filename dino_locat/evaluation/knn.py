"""Weighted k-NN classification on frozen features (DINO's protocol).

Design: docs/architecture.md#evaluation-protocols.

Search is exact inner product with faiss ``IndexFlatIP`` (cosine similarity, as features are
L2-normalised). The bank is never copied whole: it is indexed one slice at a time and the
per-slice top-k lists are merged in a heap, while queries go through in batches. Peak
memory is the bank itself plus one slice, whatever the number of queries. The bank need not
be held at all (``NeighborStream``): the online k-NN streams each rank's shard of it, batch
by batch, and merges the ranks' top-k lists (``merge_over_ranks``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from dino_locat.checkpoint import CheckpointError, load_checkpoint
from dino_locat.data.transforms import eval_transform
from dino_locat.distributed import gather_rows, is_distributed, is_main_process
from dino_locat.evaluation.backbone import frozen_backbone
from dino_locat.evaluation.features import (
    cached_features,
    extract_features,
    flattened_pixels,
    load_features,
    normalized_cls,
)
from dino_locat.evaluation.metrics import topk_correct
from dino_locat.evaluation.options import (
    EvaluationInputError,
    add_backbone_args,
    add_run_args,
    add_subset_args,
    check_positive,
    default_output_dir,
    resolve_device,
)
from dino_locat.evaluation.report import Report
from dino_locat.evaluation.splits import classification_splits

TEMPERATURE = 0.07
DEFAULT_KS = (10, 20, 100, 200)
SLICE_FLOATS = 1 << 25  # bank slice indexed at once: 128 MB of float32
QUERY_BATCH = 4096
# Embedded default (Fashion-MNIST train/test): about a minute for a ViT-S at 32 px on 2 idle cores.
EMBEDDED_SIZES = (10000, 2000)
# Where the features come from: exactly one of these flags.
SOURCES = ("pretrained_weights", "load_features", "raw_pixels")
FEATURE_FILES = {"train": "train_features.pth", "test": "test_features.pth"}
# DINO's eval_knn.py --dump_features: four bare tensors, features already L2-normalised.
DINO_FEATURE_FILES = {
    "train": ("trainfeat.pth", "trainlabels.pth"),
    "test": ("testfeat.pth", "testlabels.pth"),
}


def _as_float32(x: Tensor | np.ndarray) -> np.ndarray:
    """A C-contiguous float32 numpy view (no copy when ``x`` already is one)."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class NeighborStream:
    """Top-``k`` inner products of fixed queries against a bank that arrives in pieces.

    Each piece is indexed on its own and its per-query top-k lists are merged into a heap,
    so only one piece is held at a time: the bank can come straight from a feature
    extractor, or from this rank's shard of it (:func:`merge_over_ranks` then joins the
    ranks' lists).
    """

    def __init__(self, queries: Tensor | np.ndarray, k: int, query_batch: int = QUERY_BATCH):
        self.queries = _as_float32(queries)
        self.k, self.query_batch = k, query_batch
        self.heap = faiss.ResultHeap(len(self.queries), k, keep_max=True)

    def add(self, bank_part: Tensor | np.ndarray, first_id: int) -> None:
        """Search ``bank_part``, whose rows have ids ``first_id, first_id + 1, ...``."""
        bank_part = _as_float32(bank_part)
        dim = self.queries.shape[1]
        if bank_part.shape[1] != dim:
            raise ValueError(f"queries have dim {dim}, the bank has {bank_part.shape[1]}")
        index = faiss.IndexFlatIP(dim)
        index.add(bank_part)
        kk = min(self.k, index.ntotal)
        if kk == 0:
            return
        for q0 in range(0, len(self.queries), self.query_batch):
            q1 = min(q0 + self.query_batch, len(self.queries))
            sims, ids = index.search(self.queries[q0:q1], kk)
            self.heap.add_result_subset(np.arange(q0, q1), sims, ids + first_id)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (Q, k) float32, bank ids (Q, k) int64), best first; a query that saw
        fewer than k bank rows gets id -1 (and the lowest float) in the places left over."""
        self.heap.finalize()
        return self.heap.D, self.heap.I


def nearest_neighbors(
    bank: Tensor | np.ndarray,
    queries: Tensor | np.ndarray,
    k: int,
    query_batch: int = QUERY_BATCH,
    slice_rows: int | None = None,
    verbose: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of every query against the bank, best first.

    Returns (similarities (Q, k) float32, bank indices (Q, k) int64). ``k`` must not
    exceed the bank size.
    """
    bank, queries = _as_float32(bank), _as_float32(queries)
    rows, dim = bank.shape
    if queries.shape[1] != dim:
        raise ValueError(f"queries have dim {queries.shape[1]}, the bank has {dim}")
    if not 0 < k <= rows:
        raise ValueError(f"k={k} must be in 1..{rows} (the bank size)")
    slice_rows = slice_rows or max(k, SLICE_FLOATS // dim)
    stream = NeighborStream(queries, k, query_batch)
    start_time = time.perf_counter()
    for start in range(0, rows, slice_rows):
        stream.add(bank[start : start + slice_rows], start)
        if verbose:
            done = min(start + slice_rows, rows)
            elapsed = time.perf_counter() - start_time
            print(
                f"  k-NN search: {done}/{rows} bank rows, {done / elapsed:.0f} rows/s, "
                f"ETA {elapsed * (rows - done) / done:.0f}s",
                flush=True,
            )
    return stream.result()


def merge_over_ranks(sims: np.ndarray, ids: np.ndarray) -> tuple[Tensor, Tensor]:
    """The top-k over the whole bank, on every rank, from each rank's top-k over its shard
    (same queries everywhere, bank ids global). One process gets its own lists back."""
    queries, k = sims.shape
    sims_t, ids_t = torch.from_numpy(sims), torch.from_numpy(ids)
    if not is_distributed():
        return sims_t, ids_t
    every_sims = gather_rows(sims_t, to_all=True).view(-1, queries, k)
    every_ids = gather_rows(ids_t, to_all=True).view(-1, queries, k)
    joined_sims = every_sims.permute(1, 0, 2).reshape(queries, -1)
    joined_ids = every_ids.permute(1, 0, 2).reshape(queries, -1)
    best, where = joined_sims.topk(k, dim=1)
    return best, joined_ids.gather(1, where)


def weighted_vote(
    similarities: Tensor, neighbor_labels: Tensor, num_classes: int, temperature: float
) -> Tensor:
    """Class scores (Q, C): each neighbour votes ``exp(sim / T)`` for its label."""
    weights = (similarities / temperature).exp()
    scores = torch.zeros(similarities.shape[0], num_classes, dtype=weights.dtype)
    return scores.scatter_add_(1, neighbor_labels, weights)


def effective_ks(ks: Sequence[int], bank_size: int) -> dict[int, int]:
    """Requested k -> k used: a k larger than the bank is clipped to the bank size."""
    if any(k <= 0 for k in ks):
        raise ValueError(f"--nb_knn values must be positive, got {list(ks)}")
    return {k: min(k, bank_size) for k in ks}


def knn_scores(
    train_features: Tensor | np.ndarray,
    train_labels: Tensor,
    test_features: Tensor | np.ndarray,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = TEMPERATURE,
    verbose: bool = False,
) -> dict[int, Tensor]:
    """Class scores (Q, C) of every test feature for every requested k (one search)."""
    used = effective_ks(ks, len(train_labels))
    sims, ids = nearest_neighbors(
        train_features, test_features, max(used.values()), verbose=verbose
    )
    sims, ids = torch.from_numpy(sims), torch.from_numpy(ids)
    neighbor_labels = torch.as_tensor(train_labels, dtype=torch.long)[ids]
    return {
        k: weighted_vote(sims[:, :kk], neighbor_labels[:, :kk], num_classes, temperature)
        for k, kk in used.items()
    }


def knn_accuracy(
    train_features: Tensor | np.ndarray,
    train_labels: Tensor,
    test_features: Tensor | np.ndarray,
    test_labels: Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = TEMPERATURE,
    verbose: bool = False,
) -> dict[int, dict[str, float | int | None]]:
    """Top-1 / top-5 accuracy (%) per k; top-5 is None with fewer than 5 classes."""
    scores = knn_scores(
        train_features, train_labels, test_features, num_classes, ks, temperature, verbose
    )
    return scores_accuracy(scores, test_labels, effective_ks(ks, len(train_labels)))


def neighbor_accuracy(
    sims: Tensor,
    neighbor_labels: Tensor,
    test_labels: Tensor,
    num_classes: int,
    ks: Sequence[int],
    temperature: float = TEMPERATURE,
) -> dict[int, dict[str, float | int | None]]:
    """:func:`knn_accuracy` from a finished search: each query's (Q, k) best similarities
    (best first) and their labels, k at least the largest k used."""
    used = effective_ks(ks, sims.shape[1])
    scores = {
        k: weighted_vote(sims[:, :kk], neighbor_labels[:, :kk], num_classes, temperature)
        for k, kk in used.items()
    }
    return scores_accuracy(scores, test_labels, used)


def scores_accuracy(
    scores: dict[int, Tensor], test_labels: Tensor, used: dict[int, int]
) -> dict[int, dict[str, float | int | None]]:
    """Top-1 / top-5 accuracy (%) of the class scores of every k."""
    test_labels = torch.as_tensor(test_labels, dtype=torch.long)
    results = {}
    for k, class_scores in scores.items():
        top1, top5 = topk_correct(class_scores, test_labels, (1, 5))
        results[k] = {
            "k_used": used[k],
            "top1": 100.0 * top1 / len(test_labels),
            "top5": None if top5 is None else 100.0 * top5 / len(test_labels),
        }
    return results


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "Weighted k-NN evaluation of a frozen backbone (DINO protocol)", add_help=add_help
    )
    add_backbone_args(parser, required=False, compilable=True, raw_pixels=True)
    add_subset_args(parser, *EMBEDDED_SIZES)
    add_run_args(parser, batch_size=128)
    group = parser.add_argument_group("k-NN")
    group.add_argument(
        "--nb_knn", type=int, nargs="+", default=list(DEFAULT_KS), help="k values (10 20 100 200)"
    )
    group.add_argument(
        "--temperature", type=float, default=TEMPERATURE, help="vote weight exp(sim / T) (0.07)"
    )
    group.add_argument(
        "--dump_features",
        default=None,
        help="save train/test features to DIR; a rerun with the same checkpoint and data "
        "reuses them",
    )
    group.add_argument(
        "--load_features",
        default=None,
        help="evaluate features saved by --dump_features in DIR, ours or those of DINO's "
        "eval_knn.py (trainfeat.pth, testfeat.pth, trainlabels.pth, testlabels.pth); no "
        "backbone is loaded",
    )
    return parser


def _dino_dump(folder: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """The features and labels DINO's eval_knn.py dumped in ``folder``, checked for shape."""
    loaded = {}
    for split, names in DINO_FEATURE_FILES.items():
        tensors = []
        for name in names:
            try:
                tensor = load_checkpoint(folder / name)
            except CheckpointError as err:
                raise EvaluationInputError(f"--load_features {folder}: {err}") from err
            if not isinstance(tensor, Tensor):
                raise EvaluationInputError(f"--load_features: {folder / name} is not a tensor")
            tensors.append(tensor)
        features, labels = tensors
        if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
            raise EvaluationInputError(
                f"--load_features {folder}: {names[0]} {tuple(features.shape)} and {names[1]} "
                f"{tuple(labels.shape)} are not (N, D) features with N labels"
            )
        loaded[split] = (features.float(), labels.long())
    return loaded


def _features_from_disk(folder: Path) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Any]]:
    if not (folder / FEATURE_FILES["train"]).is_file() and (folder / "trainfeat.pth").is_file():
        print(f"{folder}: features dumped by DINO's eval_knn.py", flush=True)
        return _dino_dump(folder), {"data": f"DINO feature dump in {folder}"}
    loaded, info = {}, {}
    for split, name in FEATURE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise EvaluationInputError(f"--load_features {folder}: {name} is missing")
        features, labels, info = load_features(path)
        loaded[split] = (features, labels)
    return loaded, info.get("fingerprint", {})


def _features_from_backbone(
    args: argparse.Namespace,
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Any]]:
    device = resolve_device(args.device)
    model, info = frozen_backbone(args, device)
    embed = flattened_pixels if args.raw_pixels else normalized_cls
    transform = eval_transform(info["image_size"])
    splits = classification_splits(
        args.data_path, transform, transform, args.train_subset, args.test_subset, EMBEDDED_SIZES
    )
    print(splits.description, flush=True)
    described = {
        "weights": info["weights_file"],
        "checkpoint": info["checkpoint"],
        "checkpoint_key": info["checkpoint_key"],
        "arch": info["arch"],
        "epoch": info["epoch"],
        "image_size": info["image_size"],
        "data": splits.description,
        "classes": list(splits.classes),
    }
    features = {}
    for split, dataset in (("train", splits.train), ("test", splits.test)):
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size_per_gpu,
            num_workers=args.num_workers,
            pin_memory=device.type == "cuda",
        )
        path = Path(args.dump_features) / FEATURE_FILES[split] if args.dump_features else None
        compute = partial(
            extract_features,
            model,
            loader,
            embed,
            device,
            f"{split} features",
            to_all_ranks=False,
        )
        features[split] = cached_features(path, {**described, "split": split}, compute)
    return features, described


def run_knn(args: argparse.Namespace) -> dict[str, Any]:
    """Extract (or load) features, vote for every k, report to stdout/JSON/TensorBoard."""
    check_positive(args, "nb_knn", "temperature", "batch_size_per_gpu")
    given = [f"--{name}" for name in SOURCES if getattr(args, name)]
    if len(given) > 1:
        raise EvaluationInputError(f"{' and '.join(given)} exclude each other")
    if args.load_features:
        features, described = _features_from_disk(Path(args.load_features))
        output_dir = Path(args.output_dir or Path(args.load_features) / "eval_knn")
    elif args.pretrained_weights or args.raw_pixels:
        features, described = _features_from_backbone(args)
        output_dir = default_output_dir(args, "knn")
    else:
        raise EvaluationInputError(
            "give --pretrained_weights CHECKPOINT (or --load_features DIR, or --raw_pixels)"
        )
    if not is_main_process():
        return {}  # rank 0 holds the gathered features and runs the search
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    classes = described.get("classes") or [str(i) for i in range(int(train_y.max()) + 1)]
    used = effective_ks(args.nb_knn, len(train_y))
    for k, kk in used.items():
        if kk < k:
            print(f"note: k={k} exceeds the {len(train_y)} training features; using k={kk}")
    if len(classes) < 5:
        print(f"note: {len(classes)} classes, so top-5 accuracy is not reported")
    accuracy = knn_accuracy(
        train_x,
        train_y,
        test_x,
        test_y,
        len(classes),
        args.nb_knn,
        args.temperature,
        verbose=len(train_y) > 100_000,
    )
    report = Report(output_dir, "knn")
    step = described.get("epoch") or 0
    for k, values in accuracy.items():
        top5 = "-" if values["top5"] is None else f"{values['top5']:.2f}%"
        print(f"{k:>4}-NN  top-1 {values['top1']:.2f}%  top-5 {top5}", flush=True)
        for name in ("top1", "top5"):
            if values[name] is not None:
                report.scalar(f"{name}_k{k}", values[name], step)
    results = {
        "evaluation": "knn",
        **{k: described.get(k) for k in ("checkpoint", "checkpoint_key", "arch", "epoch")},
        **{k: described.get(k) for k in ("image_size", "data")},
        "num_classes": len(classes),
        "train_size": len(train_y),
        "test_size": len(test_y),
        "temperature": args.temperature,
        "knn": {str(k): v for k, v in accuracy.items()},
    }
    report.finish(results)
    return results
