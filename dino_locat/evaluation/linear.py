"""Linear probe on a frozen backbone, many heads at once.

Design: docs/architecture.md#evaluation-protocols.

Every (n_last_blocks, avgpool_patchtokens, learning rate) combination gets its own linear
head, and all heads train together: each batch goes through the backbone once (or comes
from the feature cache) and every head reads its own slice of that one forward. The head
and its epoch are chosen on a held-out part of the training split (``--val_fraction`` of
each class, or ``--val_data_path``), never on the test split; only the chosen head is then
evaluated on the test split, once: that is the headline number. The DINO-protocol head
(fixed blocks and pooling, lr and epoch chosen the same way) is reported on its own line for
comparison with published tables. Optimiser as DINO's linear eval: SGD, momentum 0.9, no
weight decay, lr scaled by batch/256, cosine to 0.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import transforms

from dino_locat.checkpoint import load_checkpoint, plain_args
from dino_locat.data.transforms import BICUBIC, IMAGENET_MEAN, IMAGENET_STD, eval_transform
from dino_locat.evaluation.backbone import frozen_backbone
from dino_locat.evaluation.features import (
    FrozenBatches,
    feature_bytes,
    linear_features,
    stacked_linear_features,
)
from dino_locat.evaluation.metrics import topk_correct
from dino_locat.evaluation.options import (
    EvaluationInputError,
    add_backbone_args,
    add_run_args,
    add_subset_args,
    boolean_choices,
    check_positive,
    default_output_dir,
    resolve_device,
)
from dino_locat.evaluation.report import Report
from dino_locat.evaluation.splits import classification_splits
from dino_locat.logging import Progress
from dino_locat.options import bool_flag
from dino_locat.schedules import cosine_schedule

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
DEFAULT_N_LAST_BLOCKS = (1, 4)
# Embedded default (Fashion-MNIST): cached features, about a minute for a ViT-S at 32 px.
EMBEDDED_SIZES = (10000, 2000)
EMBEDDED_EPOCHS = 20
DINO_EPOCHS = 100


@dataclass(frozen=True)
class HeadSpec:
    n_last_blocks: int
    avgpool_patchtokens: bool
    lr: float

    @property
    def name(self) -> str:
        return f"n{self.n_last_blocks}_pool{int(self.avgpool_patchtokens)}_lr{self.lr:g}"


class LinearHeads(nn.Module):
    """One linear classifier per spec, all fed from one stacked feature tensor."""

    def __init__(self, specs: list[HeadSpec], embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.specs = specs
        self.heads = nn.ModuleList()
        for spec in specs:
            head = nn.Linear(
                embed_dim * (spec.n_last_blocks + spec.avgpool_patchtokens), num_classes
            )
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
            self.heads.append(head)

    def forward(self, stacked: Tensor) -> list[Tensor]:
        inputs: dict[tuple[int, bool], Tensor] = {}
        logits = []
        for spec, head in zip(self.specs, self.heads, strict=True):
            key = (spec.n_last_blocks, spec.avgpool_patchtokens)
            if key not in inputs:
                inputs[key] = linear_features(stacked, *key)
            logits.append(head(inputs[key]))
        return logits


def linear_train_transform(image_size: int) -> transforms.Compose:
    """DINO's linear-probe augmentation: random-resized crop and horizontal flip."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, interpolation=BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@torch.no_grad()
def evaluate_heads(heads: LinearHeads, batches: FrozenBatches) -> list[dict[str, float | None]]:
    """Top-1 / top-5 (%) of every head on one pass over ``batches``."""
    heads.eval()
    correct = torch.zeros(len(heads.specs), 2, dtype=torch.long)
    has_top5 = True
    total = 0
    for stacked, labels in batches.epoch(0):
        for i, logits in enumerate(heads(stacked)):
            top1, top5 = topk_correct(logits.cpu(), labels.cpu(), (1, 5))
            correct[i, 0] += top1
            has_top5 = top5 is not None
            correct[i, 1] += top5 or 0
        total += len(labels)
    return [
        {"top1": 100.0 * int(c[0]) / total, "top5": 100.0 * int(c[1]) / total if has_top5 else None}
        for c in correct
    ]


@dataclass
class Choice:
    """The head a selection settled on, with its weights at its best held-out epoch."""

    index: int
    val_top1: float
    epoch: int
    state: dict[str, Tensor]


def dino_protocol_head(arch: str, depth: int) -> tuple[int, bool]:
    """(n_last_blocks, avgpool) of the head published tables use for ``arch``.

    DINO: ViT-S (and smaller) the CLS of the last 4 blocks without pooling, ViT-B the last
    block with the pooled patch tokens; the LocAtViT paper: the last block. Clipped to the
    backbone's depth (tiny test networks).
    """
    if arch.startswith("locatvit"):
        n, pool = 1, False
    elif arch.startswith("vit_b"):
        n, pool = 1, True
    else:
        n, pool = 4, False
    return min(n, depth), pool


def resolve_n_last_blocks(requested: list[int] | None, depth: int) -> list[int]:
    """The n_last_blocks variants to train on a ``depth``-block backbone.

    The default variants are DINO's (1 and 4); a shallower backbone simply lacks the deep
    ones, so they are dropped with a note. A value the user asked for is never dropped:
    one deeper than the backbone is an error naming the flag.
    """
    if requested is None:
        kept = [n for n in DEFAULT_N_LAST_BLOCKS if n <= depth]
        dropped = [n for n in DEFAULT_N_LAST_BLOCKS if n > depth]
        if dropped:
            print(
                f"note: the backbone has {depth} block(s): default --n_last_blocks variant(s) "
                f"{' '.join(map(str, dropped))} dropped, training {' '.join(map(str, kept))}",
                flush=True,
            )
        return kept
    if max(requested) > depth:
        raise EvaluationInputError(
            f"--n_last_blocks {max(requested)} exceeds the backbone's {depth} blocks"
        )
    return list(dict.fromkeys(requested))


def train_linear_heads(
    heads: LinearHeads,
    train: FrozenBatches,
    val: FrozenBatches,
    epochs: int,
    batch_size: int,
    val_freq: int,
    report: Report,
    groups: dict[str, list[int]],
) -> tuple[list[dict[str, Any]], dict[str, Choice]]:
    """Train all heads jointly, validating on the held-out ``val`` batches.

    Returns per-head best held-out records and, for each named group of head indices, the
    head with the best held-out top-1 (first reached) with its weights at that epoch.
    """
    optimizer = torch.optim.SGD(
        [
            {"params": h.parameters(), "lr": s.lr * batch_size / 256}
            for s, h in zip(heads.specs, heads.heads, strict=True)
        ],
        momentum=0.9,
        weight_decay=0.0,
    )
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    factor = cosine_schedule(1.0, 0.0, epochs, len(train))
    records = [
        {**asdict(s), "name": s.name, "val_top1": -1.0, "val_top5": None, "epoch": None}
        for s in heads.specs
    ]
    chosen: dict[str, Choice] = {}
    step = 0
    for epoch in range(epochs):
        heads.train()
        progress = Progress(
            train.epoch(epoch), len(train), header=f"linear epoch {epoch + 1}/{epochs}"
        )
        for stacked, labels in progress:
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * float(factor[step])
            losses = torch.stack([F.cross_entropy(out, labels) for out in heads(stacked)])
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            step += 1
            if progress.due:
                mean_loss = float(losses.detach().mean())
                progress.log(
                    *progress.rate(), loss_mean=mean_loss, loss_min=float(losses.detach().min())
                )
                report.scalar("train/loss_mean", mean_loss, step)
        if (epoch + 1) % val_freq and epoch + 1 != epochs:
            continue
        accuracies = evaluate_heads(heads, val)
        for acc, record in zip(accuracies, records, strict=True):
            report.scalar(f"val_top1/{record['name']}", acc["top1"], epoch + 1)
            if acc["top1"] > record["val_top1"]:
                record.update(val_top1=acc["top1"], val_top5=acc["top5"], epoch=epoch + 1)
        for name, members in groups.items():
            best = max(members, key=lambda i: (accuracies[i]["top1"], -i))
            if name not in chosen or accuracies[best]["top1"] > chosen[name].val_top1:
                state = copy.deepcopy(heads.heads[best].state_dict())
                chosen[name] = Choice(best, accuracies[best]["top1"], epoch + 1, state)
        selected = chosen["selected"]
        print(
            f"epoch {epoch + 1}: best held-out head so far {records[selected.index]['name']} "
            f"top-1 {selected.val_top1:.2f}% (epoch {selected.epoch})",
            flush=True,
        )
        report.scalar("val_top1/best", selected.val_top1, epoch + 1)
    return records, chosen


def evaluate_on_test(
    specs: list[HeadSpec],
    states: list[dict[str, Tensor]],
    embed_dim: int,
    num_classes: int,
    test: FrozenBatches,
    device: torch.device,
) -> list[dict[str, float | None]]:
    """Top-1 / top-5 (%) on the test split of the chosen heads: the one look at it."""
    chosen = LinearHeads(specs, embed_dim, num_classes).to(device)
    for head, state in zip(chosen.heads, states, strict=True):
        head.load_state_dict(state)
    return evaluate_heads(chosen, test)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "Linear probe of a frozen backbone: a grid of heads trained in one pass",
        add_help=add_help,
    )
    add_backbone_args(parser, required=False, compilable=True, raw_pixels=True)
    add_subset_args(parser, *EMBEDDED_SIZES)
    add_run_args(parser, batch_size=128)
    group = parser.add_argument_group("linear probe")
    group.add_argument(
        "--n_last_blocks",
        type=int,
        nargs="+",
        default=None,
        help="CLS tokens of the last n blocks are concatenated; each value is one variant "
        "(default: 1 4, those deeper than the backbone dropped)",
    )
    group.add_argument(
        "--avgpool_patchtokens",
        type=bool_flag,
        nargs="+",
        default=[False, True],
        help="also concatenate the mean patch token; false/true, both by default",
    )
    group.add_argument(
        "--lrs",
        "--lr",
        dest="lrs",
        type=float,
        nargs="+",
        default=list(DEFAULT_LRS),
        help="learning rates at batch 256, one head each (default: 1e-4 ... 0.1)",
    )
    group.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"default: {DINO_EPOCHS} with --data_path, {EMBEDDED_EPOCHS} on Fashion-MNIST",
    )
    group.add_argument(
        "--augment",
        type=bool_flag,
        default=None,
        help="random-resized crop + flip on training images, backbone run every epoch "
        "(default: true with --data_path as in DINO, false on Fashion-MNIST: features cached)",
    )
    group.add_argument(
        "--cache_limit_gb",
        type=float,
        default=4.0,
        help="cache frozen features in memory only below this size (default: 4)",
    )
    group.add_argument(
        "--val_freq", type=int, default=1, help="validate on the held-out part every N epochs (1)"
    )
    group.add_argument(
        "--val_fraction",
        type=float,
        default=0.1,
        help="part of each training class held out to choose the head and its epoch "
        "(default: 0.1); the test split is only used once, for the chosen head",
    )
    group.add_argument(
        "--val_data_path",
        default=None,
        help="class folders (same classes as train) to choose the head on instead; the "
        "whole training split is then trained on",
    )
    group.add_argument(
        "--evaluate",
        action="store_true",
        help="no training: evaluate the head saved by an earlier run (--pretrained_linear) on "
        "the evaluation split",
    )
    group.add_argument(
        "--pretrained_linear",
        default=None,
        help="head file for --evaluate (default: the linear_head.pth that training wrote in "
        "--output_dir); results go to its evaluate/ sub-folder",
    )
    return parser


def run_linear(args: argparse.Namespace) -> dict[str, Any]:
    """Train the grid of heads, choose on held-out data, test the chosen heads once."""
    check_positive(args, "n_last_blocks", "lrs", "epochs", "batch_size_per_gpu", "val_freq")
    if args.evaluate:
        return evaluate_saved_head(args)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model, info = frozen_backbone(args, device)
    depth = info["depth"]
    n_last_blocks = resolve_n_last_blocks(args.n_last_blocks, depth)
    if args.val_data_path is None and not 0 < args.val_fraction < 1:
        raise EvaluationInputError(
            f"--val_fraction must be in (0, 1), got {args.val_fraction}: the head is chosen on "
            "held-out training images (or give --val_data_path), never on the test split"
        )
    embedded = args.data_path is None
    epochs = args.epochs or (EMBEDDED_EPOCHS if embedded else DINO_EPOCHS)
    augment = (not embedded) if args.augment is None else args.augment
    test_transform = eval_transform(info["image_size"])
    train_transform = linear_train_transform(info["image_size"]) if augment else test_transform
    splits = classification_splits(
        args.data_path,
        train_transform,
        test_transform,
        args.train_subset,
        args.test_subset,
        EMBEDDED_SIZES,
        val_fraction=args.val_fraction,
        val_data_path=args.val_data_path,
        seed=args.seed,
    )
    print(splits.description, flush=True)
    protocol = dino_protocol_head(info["arch"], depth)
    pools = boolean_choices(args.avgpool_patchtokens, [False, True])
    grid = [(n, pool) for n in n_last_blocks for pool in pools]
    if protocol not in grid:
        print(f"adding the DINO-protocol variant n_last_blocks {protocol[0]}, avgpool "
              f"{protocol[1]} to the grid", flush=True)  # fmt: skip
        grid.append(protocol)
    specs = [HeadSpec(n, pool, lr) for n, pool in grid for lr in args.lrs]
    embed = partial(stacked_linear_features, n_last_blocks=max(n for n, _ in grid))
    limit = args.cache_limit_gb * 2**30
    batches = {}
    for split, dataset in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        size = feature_bytes(model, dataset, embed, device)
        cache = (split != "train" or not augment) and size <= limit
        print(
            f"{split}: {len(dataset)} images, features {size / 2**30:.2f} GB "
            f"{'cached in memory' if cache else 'recomputed every pass'}",
            flush=True,
        )
        batches[split] = FrozenBatches(
            model,
            dataset,
            embed,
            device,
            args.batch_size_per_gpu,
            args.num_workers,
            cache,
            shuffle=split == "train",
            seed=args.seed,
            header=f"{split} features",
        )
    print(
        f"training {len(specs)} heads for {epochs} epochs (augment={augment}): "
        f"(n_last_blocks, avgpool) {grid} x lr {args.lrs}",
        flush=True,
    )
    heads = LinearHeads(specs, info["embed_dim"], len(splits.classes)).to(device)
    output_dir = default_output_dir(args, "linear")
    report = Report(output_dir, "linear")
    groups = {
        "selected": list(range(len(specs))),
        "dino_protocol": [
            i for i, s in enumerate(specs) if (s.n_last_blocks, s.avgpool_patchtokens) == protocol
        ],
    }
    records, chosen = train_linear_heads(
        heads,
        batches["train"],
        batches["val"],
        epochs,
        args.batch_size_per_gpu,
        args.val_freq,
        report,
        groups,
    )
    for record in sorted(records, key=lambda r: -r["val_top1"]):
        top5 = "-" if record["val_top5"] is None else f"{record['val_top5']:.2f}%"
        print(
            f"{record['name']:<28} held-out top-1 {record['val_top1']:.2f}%  top-5 {top5}  "
            f"(epoch {record['epoch']})"
        )
    tested = evaluate_on_test(
        [specs[c.index] for c in chosen.values()],
        [c.state for c in chosen.values()],
        info["embed_dim"],
        len(splits.classes),
        batches["test"],
        device,
    )
    outcome = {}
    for (name, choice), test in zip(chosen.items(), tested, strict=True):
        spec = specs[choice.index]
        outcome[name] = {
            **asdict(spec),
            "name": spec.name,
            "epoch": choice.epoch,
            "val_top1": choice.val_top1,
            "test_top1": test["top1"],
            "test_top5": test["top5"],
        }
        report.scalar(f"test_top1/{name}", test["top1"], epochs)
    selected, protocol_head = outcome["selected"], outcome["dino_protocol"]
    head_path = report.save_checkpoint(
        {
            "head": chosen["selected"].state,
            "spec": {k: selected[k] for k in ("n_last_blocks", "avgpool_patchtokens", "lr")},
            "classes": list(splits.classes),
            "embed_dim": info["embed_dim"],
            "epoch": selected["epoch"],
            "val": {"top1": selected["val_top1"]},
            "test": {"top1": selected["test_top1"], "top5": selected["test_top5"]},
            "backbone": {
                k: info[k]
                for k in ("checkpoint", "checkpoint_key", "arch", "patch_size", "image_size")
            },
            "args": plain_args(args),
        },
        output_dir / "linear_head.pth",
    )
    for label, entry in (("headline", selected), ("DINO protocol", protocol_head)):
        top5 = "-" if entry["test_top5"] is None else f"{entry['test_top5']:.2f}%"
        print(
            f"{label}: test top-1 {entry['test_top1']:.2f}%  top-5 {top5}  (head {entry['name']}, "
            f"epoch {entry['epoch']}, chosen on held-out top-1 {entry['val_top1']:.2f}%)",
            flush=True,
        )
    print(f"headline head saved to {head_path}")
    results = {
        "evaluation": "linear",
        **{k: info[k] for k in ("checkpoint", "checkpoint_key", "arch", "epoch", "image_size")},
        "data": splits.description,
        "num_classes": len(splits.classes),
        "epochs": epochs,
        "augment": augment,
        "n_last_blocks": n_last_blocks,
        "selection": "head (lr x blocks x pooling) and epoch with the best top-1 on the held-out "
        "part of the training split; the test split is evaluated once, for the chosen heads",
        "headline": selected,
        "dino_protocol": {
            **protocol_head,
            "rule": "DINO's head for this arch (ViT-S: last 4 blocks, no pooling; ViT-B: last "
            "block + pooled patches; LocAtViT paper: last block), lr and epoch chosen on the "
            "held-out part",
        },
        "head_file": str(head_path),
        "heads_held_out": records,
    }
    report.finish(results)
    return results


def evaluate_saved_head(args: argparse.Namespace) -> dict[str, Any]:
    """``--evaluate``: top-1/top-5 of a saved head on the evaluation split, nothing trained
    (results in ``<output_dir>/evaluate``, beside the training run's).

    The head file says which features it reads (n_last_blocks, avgpool) and which classes
    it predicts; both are checked against the backbone and the data before evaluating.
    """
    output_dir = default_output_dir(args, "linear")
    path = Path(args.pretrained_linear or output_dir / "linear_head.pth")
    saved = load_checkpoint(path, hint="pass the linear_head.pth that eval/linear.py wrote")
    try:
        spec = HeadSpec(**saved["spec"])
        state, saved_classes = saved["head"], list(saved["classes"])
    except (KeyError, TypeError) as err:
        raise EvaluationInputError(
            f"--pretrained_linear {path}: not a head saved by eval/linear.py ({err!r} missing)"
        ) from err
    device = resolve_device(args.device)
    model, info = frozen_backbone(args, device)
    if spec.n_last_blocks > info["depth"]:
        raise EvaluationInputError(
            f"--pretrained_linear {path} reads {spec.n_last_blocks} blocks; the backbone has "
            f"{info['depth']}"
        )
    transform = eval_transform(info["image_size"])
    splits = classification_splits(
        args.data_path, transform, transform, args.train_subset, args.test_subset, EMBEDDED_SIZES
    )
    if list(splits.classes) != saved_classes:
        raise EvaluationInputError(
            f"--pretrained_linear {path} predicts {len(saved_classes)} classes "
            f"({', '.join(saved_classes[:5])} ...), the data has {len(splits.classes)} "
            f"({', '.join(list(splits.classes)[:5])} ...)"
        )
    heads = LinearHeads([spec], info["embed_dim"], len(saved_classes))
    try:
        heads.heads[0].load_state_dict(state)
    except RuntimeError as err:
        raise EvaluationInputError(
            f"--pretrained_linear {path} does not fit {info['arch']} features: {err}"
        ) from err
    print(f"evaluating head {spec.name} from {path} on {splits.description}", flush=True)
    embed = partial(stacked_linear_features, n_last_blocks=spec.n_last_blocks)
    batches = FrozenBatches(
        model,
        splits.test,
        embed,
        device,
        args.batch_size_per_gpu,
        args.num_workers,
        cache=True,
        shuffle=False,
        header="test features",
    )
    accuracy = evaluate_heads(heads.to(device), batches)[0]
    top5 = "-" if accuracy["top5"] is None else f"{accuracy['top5']:.2f}%"
    print(f"{spec.name}: top-1 {accuracy['top1']:.2f}%  top-5 {top5}", flush=True)
    report = Report(output_dir / "evaluate", "linear_evaluate")
    results = {
        "evaluation": "linear_evaluate",
        **{k: info[k] for k in ("checkpoint", "checkpoint_key", "arch", "epoch", "image_size")},
        "data": splits.description,
        "head_file": str(path),
        "head": spec.name,
        **accuracy,
    }
    report.finish(results)
    return results
