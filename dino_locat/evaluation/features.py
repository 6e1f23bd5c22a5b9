"""The one feature extractor every evaluator uses.

Four views of a frozen backbone: the CLS embedding (k-NN), the CLS of the last n blocks
plus the average of the last block's patch tokens (linear probe), the raw patch tokens of
the last block as a feature map (segmentation) or L2-normalised, one row per patch
(Hummingbird retrieval). ``feature_batches`` runs any of them over a loader in batches
without autograd, with progress and ETA; ``extract_features`` fills one preallocated tensor
from it; ``cached_features`` keeps the result on disk keyed by a fingerprint.

Under torchrun (or SLURM) ``extract_features`` shards: each rank embeds its contiguous share
of the dataset and the shares are gathered in dataset order, so the features, and every
number computed from them, are those of one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset

from dino_locat.checkpoint import load_checkpoint, plain_args, save_checkpoint
from dino_locat.distributed import (
    broadcast_object,
    gather_rows,
    is_distributed,
    is_main_process,
    rank,
    shard_bounds,
    world_size,
)
from dino_locat.logging import Progress

Embed = Callable[[nn.Module, Tensor], Tensor]


def normalized_cls(model: nn.Module, images: Tensor) -> Tensor:
    """L2-normalised CLS embedding (B, D): cosine similarity becomes an inner product."""
    return F.normalize(model.forward_features(images)[:, 0], dim=-1)


def stacked_linear_features(model: nn.Module, images: Tensor, n_last_blocks: int) -> Tensor:
    """(B, n + 1, D): CLS of each of the last ``n`` blocks, then the last block's mean patch.

    One backbone forward holds everything any (n' <= n, avgpool) linear head needs;
    ``linear_features`` picks a variant out of it.
    """
    blocks = model.get_intermediate_layers(images, n_last_blocks)
    cls = torch.stack([tokens[:, 0] for tokens in blocks], dim=1)
    pooled = blocks[-1][:, 1:].mean(dim=1, keepdim=True)
    return torch.cat([cls, pooled], dim=1)


def linear_features(stacked: Tensor, n_last_blocks: int, avgpool: bool) -> Tensor:
    """The input of one linear head: CLS of the last ``n_last_blocks`` blocks concatenated
    (oldest first), plus the pooled patch tokens when ``avgpool``."""
    cls = stacked[:, -1 - n_last_blocks : -1].flatten(1)
    return torch.cat([cls, stacked[:, -1]], dim=1) if avgpool else cls


def flattened_pixels(model: nn.Module, images: Tensor) -> Tensor:
    """The raw-pixel baseline: each (transformed) image flattened and L2-normalised."""
    return F.normalize(model(images).flatten(1), dim=-1)


def patch_feature_map(model: nn.Module, images: Tensor) -> Tensor:
    """Last block's patch tokens before the final norm (and PRR) as a (B, D, h, w) map."""
    tokens, (h, w) = model.get_patch_tokens(images)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def normalized_patch_tokens(model: nn.Module, images: Tensor) -> Tensor:
    """Last block's patch tokens (before the final norm and PRR), L2-normalised: (B, h*w, D)."""
    tokens, _ = model.get_patch_tokens(images)
    return F.normalize(tokens, dim=-1)


@torch.no_grad()
def feature_batches(
    model: nn.Module,
    loader: DataLoader,
    embed: Embed = normalized_cls,
    device: torch.device | str = "cpu",
    header: str = "features",
    verbose: bool = True,
) -> Iterator[tuple[Tensor, Any]]:
    """(features float32 on the CPU, targets as the loader gave them), batch by batch.

    For consumers that reduce every batch as it comes (sample it, search with it) rather
    than keep every feature of the dataset. ``verbose`` prints progress with ETA and a
    summary line.
    """
    progress = Progress(loader, len(loader), header=header, enabled=verbose)
    for images, batch_targets in progress:
        yield embed(model, images.to(device, non_blocking=True)).float().cpu(), batch_targets
        if progress.due:
            progress.log(*progress.rate())
    if verbose:
        print(progress.summary(), flush=True)


def shard_dataset(dataset: Dataset) -> Dataset:
    """This rank's contiguous share of ``dataset`` (the dataset itself in one process)."""
    if not is_distributed():
        return dataset
    start, stop = shard_bounds(len(dataset), rank(), world_size())
    return Subset(dataset, range(start, stop))


def shard_header(header: str, items: int) -> str:
    """A progress header that says, with several processes, which rank's share it counts."""
    if world_size() > 1:
        return f"{header} [rank {rank()}/{world_size()}: {items} items]"
    return header


def shard_loader(loader: DataLoader) -> DataLoader:
    """The same loader over this rank's share of its dataset (in-order loaders only)."""
    if not is_distributed():
        return loader
    if not isinstance(loader.sampler, SequentialSampler):
        raise ValueError("sharded feature extraction needs an in-order (unshuffled) loader")
    return DataLoader(
        shard_dataset(loader.dataset),
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        generator=loader.generator,  # workers' seeds drawn as one process would draw them
    )


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: DataLoader,
    embed: Embed = normalized_cls,
    device: torch.device | str = "cpu",
    header: str = "features",
    verbose: bool = True,
    to_all_ranks: bool = True,
) -> tuple[Tensor, Tensor]:
    """Run ``embed`` over every (image, target) batch of ``loader``.

    Returns (features (N, ...) float32, targets (N, ...) int64), both on the CPU in loader
    order; targets are class labels or, for segmentation, masks. ``verbose`` prints
    progress with ETA and a summary line. With several processes each embeds its shard and
    all get the whole result, or, with ``to_all_ranks=False``, only rank 0 does and the
    others get empty (0-row) tensors.
    """
    features, targets = _extract_shard(model, shard_loader(loader), embed, device, header, verbose)
    if is_distributed():
        features = gather_rows(features, to_all_ranks)
        targets = gather_rows(targets, to_all_ranks)
        if is_main_process() and len(features) != len(loader.dataset):
            raise RuntimeError(f"{header}: gathered {len(features)} of {len(loader.dataset)}")
    return features, targets


def _extract_shard(
    model: nn.Module,
    loader: DataLoader,
    embed: Embed,
    device: torch.device | str,
    header: str,
    verbose: bool,
) -> tuple[Tensor, Tensor]:
    """``extract_features`` of one process over its (possibly empty) loader."""
    total = len(loader.dataset)
    features: Tensor | None = None
    targets: Tensor | None = None
    header = shard_header(header, total)
    start = 0
    for out, batch_targets in feature_batches(model, loader, embed, device, header, verbose):
        batch_targets = torch.as_tensor(batch_targets)
        if features is None or targets is None:
            features = torch.empty((total, *out.shape[1:]), dtype=torch.float32)
            targets = torch.empty((total, *batch_targets.shape[1:]), dtype=torch.long)
        features[start : start + len(out)] = out
        targets[start : start + len(out)] = batch_targets
        start += len(out)
    if start != total:
        raise RuntimeError(f"{header}: the loader gave {start} of {total} items")
    if features is None or targets is None:
        if not is_distributed():
            raise RuntimeError(f"{header}: the dataset is empty")
        features, targets = _empty_like_first(model, loader.dataset, embed, device)
    return features, targets


@torch.no_grad()
def _empty_like_first(
    model: nn.Module, dataset: Dataset, embed: Embed, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """0-row features/targets of the right trailing shape, for a rank with an empty shard
    (more ranks than items): the gather needs every rank's shape."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    image, target = base[0]
    out = embed(model, image[None].to(device)).float().cpu()
    target = torch.as_tensor(target)
    return out.new_empty((0, *out.shape[1:])), torch.empty((0, *target.shape), dtype=torch.long)


def embed_sharded(embed: Embed, model: nn.Module, images: Tensor) -> Tensor:
    """``embed`` of one batch, each rank computing its rows, every rank getting them all
    (the per-epoch path of augmented training, where no features are cached)."""
    if not is_distributed():
        return embed(model, images)
    start, stop = shard_bounds(len(images), rank(), world_size())
    if start == stop:
        part = embed(model, images[:1])[:0]
    else:
        part = embed(model, images[start:stop])
    return gather_rows(part, to_all=True).to(images.device, part.dtype)


class FrozenBatches:
    """Training batches of frozen-backbone features, epoch after epoch.

    With ``cache`` the features are extracted once and each epoch reshuffles them in
    memory (fast; right when the images are not augmented). Without it every epoch runs
    the backbone on freshly loaded (augmented) images. Either way one backbone forward
    serves every head trained on top.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        embed: Embed,
        device: torch.device,
        batch_size: int,
        num_workers: int,
        cache: bool,
        shuffle: bool = True,
        seed: int = 0,
        header: str = "features",
    ) -> None:
        self.model, self.embed, self.device = model, embed, device
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.header = header
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and not cache,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),
        )
        self.cached = None
        if cache:
            self.cached = extract_features(model, self.loader, embed, device, header)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(features, targets) batches on the device for one pass over the data."""
        if self.cached is None:
            for images, targets in self.loader:
                with torch.no_grad():
                    images = images.to(self.device, non_blocking=True)
                    features = embed_sharded(self.embed, self.model, images)
                yield features.float(), torch.as_tensor(targets).to(self.device)
            return
        features, targets = self.cached
        order = torch.arange(len(targets))
        if self.shuffle:
            order = torch.randperm(
                len(targets), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            yield features[batch].to(self.device), targets[batch].to(self.device)


@torch.no_grad()
def feature_bytes(model: nn.Module, dataset: Dataset, embed: Embed, device: torch.device) -> int:
    """Memory the features of the whole dataset would take (one sample embedded to see)."""
    image = dataset[0][0]
    out = embed(model, image[None].to(device))
    return out[0].numel() * 4 * len(dataset)


def save_features(
    path: str | os.PathLike, features: Tensor, labels: Tensor, info: Mapping[str, Any]
) -> Path:
    """Write features, labels and what produced them (atomic, like every checkpoint)."""
    return save_checkpoint({"features": features, "labels": labels, "info": dict(info)}, path)


def load_features(path: str | os.PathLike) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(features, labels, info) written by ``save_features``."""
    data = load_checkpoint(
        path, hint="pass a file written by --dump_features, or delete it to recompute it"
    )
    if not isinstance(data, Mapping) or not {"features", "labels"} <= set(data):
        raise ValueError(f"{path} is not a feature file written by save_features")
    return data["features"], data["labels"], dict(data.get("info", {}))


def cached_features(
    path: str | os.PathLike | None,
    fingerprint: Mapping[str, Any],
    compute: Callable[[], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    """``compute()``, or its earlier result stored at ``path`` if made with the same
    ``fingerprint`` (checkpoint, image size, split, subset ...). No caching when path is
    None; a stale file is recomputed and replaced. With several processes rank 0 alone
    reads and writes the file, and reused features are returned on rank 0 only (the
    other ranks get empty tensors), as ``compute`` does with ``to_all_ranks=False``."""
    fingerprint = plain_args(fingerprint)
    stored = None
    if is_main_process() and path is not None and Path(path).is_file():
        stored = load_features(path)
        if stored[2].get("fingerprint") != fingerprint:
            print(f"{path} was made from other inputs: recomputing it", flush=True)
            stored = None
    if broadcast_object(stored is not None):
        if stored is None:  # another rank: rank 0 alone holds the reused features
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        print(f"reusing features from {path}", flush=True)
        return stored[0], stored[1]
    features, labels = compute()
    if path is not None and is_main_process():
        save_features(path, features, labels, {"fingerprint": fingerprint})
        print(f"features written to {path}", flush=True)
    return features, labels
