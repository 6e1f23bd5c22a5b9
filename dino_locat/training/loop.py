"""The DINO training run: build everything, resume, train epoch by epoch, checkpoint.

Replay guarantee: a run killed anywhere and restarted from ``checkpoint.pth`` (written at
every epoch end) ends with the same weights as an uninterrupted run. The data order is
DistributedSampler(seed + epoch), every sample's views come from (seed, epoch, index), and
the model-side randomness (drop path) is reseeded from (seed, epoch, rank) at each epoch
start; nothing else draws random numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dino_locat.checkpoint import (
    RESUME_HINT,
    CheckpointError,
    checkpoint_args,
    load_checkpoint,
    plain_args,
    save_checkpoint,
)
from dino_locat.data.folders import build_pretraining_dataset
from dino_locat.data.multicrop import STREAM_MODEL, EpochSampler, MultiCropDataset, derive_seed
from dino_locat.data.transforms import MultiCropAugmentation, eval_transform
from dino_locat.distributed import (
    DistEnv,
    all_reduce_sum,
    init_distributed,
    is_distributed,
    wait_for_main,
)
from dino_locat.logging import Progress, append_json_line, format_duration, tensorboard_writer
from dino_locat.models import build_backbone
from dino_locat.models.compile import compile_blocks, strip_compile_prefix
from dino_locat.models.head import DINOHead, MultiCropWrapper
from dino_locat.schedules import cosine_schedule
from dino_locat.training.args import resolve_args
from dino_locat.training.loss import DINOLoss, koleo_loss
from dino_locat.training.online_knn import (
    RAW_PIXELS,
    backbone_scorer,
    build_knn_probe,
    knn_summary,
    raw_pixels,
)
from dino_locat.training.optim import (
    clip_gradients_per_tensor,
    drop_last_layer_grads,
    param_groups,
    update_teacher,
)
from dino_locat.training.resume import RECIPE_KEYS, SHAPE_KEYS, changed_flags, describe_changes
from dino_locat.training.signals import (
    SIGNAL_COLUMNS,
    AlarmMonitor,
    LearningSignals,
    alarm_start_step,
)

CHECKPOINT = "checkpoint.pth"
VIS_IMAGES = 4
# Where the main job points its user next: its 256 steps end before DINO learns on this
# data; the long preset trains 70 times the image views, with schedules scaled to them.
LONGER_RUNS = (
    "this preset ends before DINO learns on this data; what two hours buy "
    "(python launch/dino.py --arch locatvit_t --preset long): docs/long_run/README.md"
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stops and the last checkpoint is kept."""


def build_student_teacher(args: argparse.Namespace) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (with drop path) and teacher (without), same architecture and head."""
    extra = {} if args.depth is None else {"depth": args.depth}

    def make(drop_path_rate: float, norm_last_layer: bool) -> MultiCropWrapper:
        backbone = build_backbone(
            args.arch,
            img_size=args.global_crops_size,
            patch_size=args.patch_size,
            drop_path_rate=drop_path_rate,
            pos_embed_interpolation=args.pos_embed_interpolation,
            **extra,
        )
        head = DINOHead(backbone.embed_dim, args.out_dim, norm_last_layer=norm_last_layer)
        return MultiCropWrapper(backbone, head)

    return make(args.drop_path_rate, args.norm_last_layer), make(0.0, True)


class DinoTrainer:
    """One DINO run on this process; :meth:`fit` trains from wherever the checkpoint left off."""

    def __init__(self, args: argparse.Namespace, env: DistEnv, device: torch.device) -> None:
        self.args, self.env, self.device = args, env, device
        if args.use_fp16 and device.type != "cuda":
            args.use_fp16 = False  # fp16 autocast + grad scaler are for CUDA; CPU runs fp32
        self.is_main = env.is_main
        self.output_dir = Path(args.output_dir)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.output_dir / CHECKPOINT

        images, self.data_description = build_pretraining_dataset(
            args.data_path, args.subset or None, args.skip_corrupt
        )
        self.images = images
        augment = MultiCropAugmentation.from_args(args)
        dataset = MultiCropDataset(images, augment, args.seed)
        self.sampler = EpochSampler(dataset, env.world_size, env.rank, args.seed)
        self.loader = DataLoader(
            dataset,
            sampler=self.sampler,
            batch_size=args.batch_size_per_gpu,
            num_workers=args.num_workers,
            pin_memory=device.type == "cuda",
            drop_last=True,
            persistent_workers=args.num_workers > 0,
            generator=torch.Generator().manual_seed(args.seed + env.rank),
        )
        self.niter = len(self.loader)
        if self.niter == 0:
            raise ValueError(
                f"{self.data_description}: fewer images per process ({len(self.sampler)}) than "
                f"--batch_size_per_gpu {args.batch_size_per_gpu}; lower the batch size"
            )

        torch.manual_seed(args.seed)
        student, teacher = build_student_teacher(args)
        self.student = student.to(device)
        self.teacher = teacher.to(device)
        if getattr(args, "compile", False):
            compile_blocks(self.student)
            compile_blocks(self.teacher)
        self.student_step = self.student
        if is_distributed():
            ids = [device.index] if device.type == "cuda" else None
            self.student_step = DistributedDataParallel(self.student, device_ids=ids)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False).eval()

        self.dino_loss = DINOLoss(
            args.out_dim,
            args.local_crops_number + 2,
            args.warmup_teacher_temp,
            args.teacher_temp,
            args.warmup_teacher_temp_epochs,
            args.epochs,
            centering=args.centering,
        ).to(device)
        self.optimizer = torch.optim.AdamW(param_groups(self.student))
        self.scaler = torch.amp.GradScaler("cuda") if args.use_fp16 else None

        total_batch = args.batch_size_per_gpu * env.world_size
        self.peak_lr = args.lr * total_batch / 256
        self.lr_schedule = cosine_schedule(
            self.peak_lr, args.min_lr, args.epochs, self.niter, args.warmup_epochs
        )
        self.wd_schedule = cosine_schedule(
            args.weight_decay, args.weight_decay_end, args.epochs, self.niter
        )
        self.momentum_schedule = cosine_schedule(
            args.momentum_teacher, args.momentum_teacher_end, args.epochs, self.niter
        )
        self.alarms = AlarmMonitor(
            alarm_start_step(
                self.niter, args.epochs, args.warmup_epochs, args.warmup_teacher_temp_epochs
            ),
            {k: getattr(args, k) for k in ("teacher_temp", "lr", "momentum_teacher", "out_dim")},
        )
        self.knn_probe = build_knn_probe(args)  # on every rank: the probe is sharded
        self.knn_history: list[dict[str, Any]] = []
        self.knn_raw_pixels: float | None = None
        self.train_seconds = 0.0
        self.flag_changes: list[dict[str, Any]] = []
        self.start_epoch = self.resume()

    # -- checkpoints ----------------------------------------------------------------------
    def resume(self) -> int:
        """Load ``checkpoint.pth`` if present; return the next epoch to run."""
        if not self.checkpoint_path.exists():
            return 0
        ckpt = load_checkpoint(self.checkpoint_path, hint=RESUME_HINT)
        self.check_resume_flags(ckpt)
        try:
            self.student.load_state_dict(strip_compile_prefix(ckpt["student"]))
            self.teacher.load_state_dict(strip_compile_prefix(ckpt["teacher"]))
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.dino_loss.load_state_dict(ckpt["dino_loss"])
            if self.scaler is not None and "fp16_scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["fp16_scaler"])
            online = ckpt.get("online_knn", {})
            self.knn_history = list(online.get("history", []))
            self.knn_raw_pixels = online.get("raw_pixels")
            self.train_seconds = float(ckpt.get("train_seconds", 0.0))
            self.flag_changes = list(ckpt.get("flag_changes", [])) + self.flag_changes
            return int(ckpt["epoch"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"cannot resume from {self.checkpoint_path}: {err}") from err

    def check_resume_flags(self, ckpt: dict[str, Any]) -> None:
        """Refuse a resume whose flags would not replay the checkpoint's run.

        Flags that shape the weights always refuse; schedule-, data- and randomness-defining
        ones refuse unless ``--accept_changed_flags``, which prints and records the change.
        """
        stored = checkpoint_args(ckpt)
        if "world_size" in ckpt:
            stored["world_size"] = ckpt["world_size"]
        current = {**plain_args(self.args), "world_size": self.env.world_size}
        where = f"cannot resume from {self.checkpoint_path}"
        shape = changed_flags(stored, current, SHAPE_KEYS)
        if shape:
            raise CheckpointError(
                f"{where}: its weights were trained with other shapes ({describe_changes(shape)}"
                "); use another --output_dir or the checkpoint's flags"
            )
        recipe = changed_flags(stored, current, RECIPE_KEYS)
        if not recipe:
            return
        if not getattr(self.args, "accept_changed_flags", False):
            raise CheckpointError(
                f"{where}: these flags differ from the checkpoint's ({describe_changes(recipe)}); "
                "run with the checkpoint's flags to continue it exactly, pass "
                "--accept_changed_flags to continue with the new ones, or use another --output_dir"
            )
        epoch = int(ckpt.get("epoch", 0))
        self.say(
            f"Resuming at epoch {epoch} with changed flags (--accept_changed_flags): "
            f"{describe_changes(recipe)}; the schedules follow the new flags from here, so "
            "the run no longer replays an uninterrupted one."
        )
        self.flag_changes.append(
            {"epoch": epoch, "changes": {k: list(v) for k, v in recipe.items()}}
        )

    def save(self, next_epoch: int) -> None:
        state = {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": next_epoch,
            "args": plain_args(self.args),
            "dino_loss": self.dino_loss.state_dict(),
            "online_knn": {"history": self.knn_history, "raw_pixels": self.knn_raw_pixels},
            "train_seconds": self.train_seconds,
            "world_size": self.env.world_size,
            "flag_changes": self.flag_changes,
        }
        if self.scaler is not None:
            state["fp16_scaler"] = self.scaler.state_dict()
        save_checkpoint(state, self.checkpoint_path)
        epoch = next_epoch - 1
        if self.args.saveckp_freq and next_epoch > 0 and epoch % self.args.saveckp_freq == 0:
            save_checkpoint(state, self.output_dir / f"checkpoint{epoch:04d}.pth")

    # -- training -------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs; return a plain summary (safe to pickle for submitit)."""
        args = self.args
        if self.start_epoch >= args.epochs:
            self.say(
                f"{self.checkpoint_path} already holds all {args.epochs} epochs; nothing to do."
            )
            return self.summary(None)
        writer = None
        if self.is_main:
            writer = tensorboard_writer(self.output_dir, purge_step=self.start_epoch * self.niter)
        wait_for_main("opening its TensorBoard writer")
        start = time.perf_counter()
        stats: dict[str, Any] | None = None
        try:
            if self.start_epoch == 0 and not self.knn_history:
                self.run_knn(0, writer)
            for epoch in range(self.start_epoch, args.epochs):
                stats = self.train_one_epoch(epoch, writer)
                self.train_seconds += stats["epoch_time_s"]
                if self.knn_due(epoch + 1):
                    stats.update(self.run_knn(epoch + 1, writer))
                if self.is_main:
                    self.save(epoch + 1)
                    append_json_line(self.output_dir / "log.txt", stats)
                    self.log_epoch(writer, epoch, stats)
                wait_for_main(f"writing the checkpoint, log and figures of epoch {epoch + 1}")
        finally:
            if writer is not None:
                writer.close()
        self.say(f"Training finished in {format_duration(time.perf_counter() - start)}.")
        if self.knn_history:
            self.say(knn_summary(self.knn_history, self.knn_raw_pixels))
        return self.summary(stats)

    # -- online k-NN ----------------------------------------------------------------------
    def knn_due(self, epochs_done: int) -> bool:
        freq = self.args.knn_freq
        return self.knn_probe is not None and (
            epochs_done % freq == 0 or epochs_done == self.args.epochs
        )

    def run_knn(self, epochs_done: int, writer: Any) -> dict[str, float]:
        """Teacher and student 20-NN top-1 after ``epochs_done`` epochs.

        Every rank takes part (the probe is sharded) and gets the same numbers, so no rank
        sits in a training collective meanwhile. Recorded in the history that the
        checkpoint keeps, so the curve survives a resume.
        """
        if self.knn_probe is None:
            return {}
        start = time.perf_counter()
        scorers = {"teacher": backbone_scorer(self.teacher.backbone)}
        if epochs_done:  # untrained, the student is the teacher
            scorers["student"] = backbone_scorer(self.student.backbone)
        if self.knn_raw_pixels is None:
            self.say(f"Online k-NN: {self.knn_probe.description}")
            scorers[RAW_PIXELS] = raw_pixels()
        top1 = self.knn_probe.top1(scorers, self.device)
        self.knn_raw_pixels = top1.get(RAW_PIXELS, self.knn_raw_pixels)
        teacher = top1["teacher"]
        student = top1.get("student", teacher)
        record = {
            "epoch": epochs_done,
            "step": epochs_done * self.niter,
            "train_time_s": self.train_seconds,
            "teacher_top1": teacher,
            "student_top1": student,
            "knn_time_s": time.perf_counter() - start,
        }
        self.knn_history.append(record)
        label = "untrained" if epochs_done == 0 else f"epoch {epochs_done}"
        self.say(
            f"k-NN 20-NN top-1 ({label}): teacher {teacher:.2f}%  student {student:.2f}%  "
            f"(raw pixels {self.knn_raw_pixels:.2f}%; {record['knn_time_s']:.1f} s)"
        )
        if writer is not None:
            step = max(epochs_done * self.niter - 1, 0)
            writer.add_scalar("knn/teacher_top1", teacher, step)
            writer.add_scalar("knn/student_top1", student, step)
            writer.add_scalar("knn/untrained_top1", self.knn_history[0]["teacher_top1"], step)
            writer.add_scalar("knn/raw_pixels_top1", self.knn_raw_pixels, step)
        return {
            "knn_teacher_top1": teacher,
            "knn_student_top1": student,
            "knn_time_s": record["knn_time_s"],
        }

    def train_one_epoch(self, epoch: int, writer: Any) -> dict[str, Any]:
        args, device = self.args, self.device
        self.sampler.set_epoch(epoch)
        torch.manual_seed(derive_seed(STREAM_MODEL, args.seed, epoch, self.env.rank))
        self.student_step.train()
        signals = torch.zeros(self.niter, len(SIGNAL_COLUMNS), device=device)
        losses = signals[:, 0]
        koleo_column = SIGNAL_COLUMNS.index("koleo")

        def totals(first: int, end: int) -> Tensor:
            """The loss each step minimised (DINO + weighted KoLeo), for the finiteness check."""
            return signals[first:end, 0] + signals[first:end, koleo_column]

        progress = Progress(
            self.loader,
            self.niter,
            f"Epoch [{epoch + 1}/{args.epochs}]",
            args.print_freq,
            enabled=self.is_main,
        )
        record = self.is_main and self.teacher.backbone.locality
        checked = 0
        for i, (crops, _) in enumerate(progress):
            signals[i] = self.train_step(
                crops, epoch, epoch * self.niter + i, record and progress.due
            )
            if progress.due:
                self.check_losses(totals(checked, i + 1), epoch, checked)
                self.log_step(writer, progress, signals[checked : i + 1], epoch, checked, record)
                checked = i + 1
        total = all_reduce_sum(losses.sum().reshape(1))
        mean_loss = total.item() / (self.niter * self.env.world_size)
        if not math.isfinite(mean_loss):
            self.check_losses(totals(0, self.niter), epoch, 0)
        elapsed = time.perf_counter() - progress.start
        last = (epoch + 1) * self.niter - 1
        if self.is_main:
            print(progress.summary(), flush=True)
        epoch_signals = LearningSignals.from_rows(signals, self.args.out_dim).as_dict()
        return {
            "epoch": epoch,
            "train_loss": mean_loss,
            **{f"train_{k}": v for k, v in epoch_signals.items() if k != "loss"},
            "train_lr": float(self.lr_schedule[last]),
            "train_wd": float(self.wd_schedule[last]),
            "train_momentum": float(self.momentum_schedule[last]),
            "train_teacher_temp": self.dino_loss.teacher_temp(epoch),
            "epoch_time_s": elapsed,
            "images_per_s": self.niter * args.batch_size_per_gpu * self.env.world_size / elapsed,
        }

    def train_step(self, crops: list[Tensor], epoch: int, step: int, record: bool) -> Tensor:
        """One DINO iteration at global ``step``; returns its detached learning signals
        (loss first, see :data:`SIGNAL_COLUMNS`) without a host sync.

        ``record`` keeps the teacher's GAug var/alpha of this step for logging.
        """
        args = self.args
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.lr_schedule[step])
            if index == 0:
                group["weight_decay"] = float(self.wd_schedule[step])
        crops = [crop.to(self.device, non_blocking=True) for crop in crops]
        recording = self.teacher.backbone.recording_gaug() if record else nullcontext()
        fp16 = self.scaler is not None
        koleo = torch.zeros((), device=self.device)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=fp16):
            with torch.no_grad(), recording:
                teacher_output = self.teacher(crops[:2])
            if args.koleo_loss_weight:
                student_output, features = self.student_step(crops, return_features=True)
                global_features = features[: 2 * len(crops[0])].chunk(2)
                koleo = args.koleo_loss_weight * sum(koleo_loss(f) for f in global_features)
            else:
                student_output = self.student_step(crops)
            loss = self.dino_loss(student_output, teacher_output, epoch) + koleo
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        if args.clip_grad:
            clip_gradients_per_tensor(self.student, args.clip_grad)
        if epoch < args.freeze_last_layer:
            drop_last_layer_grads(self.student)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        update_teacher(self.student, self.teacher, float(self.momentum_schedule[step]))
        return torch.cat([self.dino_loss.last_signals, koleo.detach().reshape(1)])

    def check_losses(self, losses: Tensor, epoch: int, first: int) -> None:
        """Stop every rank as soon as any rank saw a NaN/inf loss (one small all-reduce)."""
        bad = ~torch.isfinite(losses)
        if all_reduce_sum(bad.sum().float().reshape(1)).item() == 0:
            return
        if bad.any():
            where = first + int(bad.nonzero()[0, 0])
            detail = f"is {losses[where - first].item()} at epoch {epoch} iteration {where}"
        else:
            detail = f"became non-finite on another process in epoch {epoch}"
        saved = "no checkpoint was written yet"
        if self.checkpoint_path.is_file():
            saved = f"{self.checkpoint_path} still holds the last good state"
        raise NonFiniteLossError(
            f"training stopped: the DINO loss {detail}; {saved}. "
            f"Flags that can cause it: --lr (now {self.args.lr}; lower it), --warmup_epochs "
            f"(now {self.args.warmup_epochs}; lengthen it), --teacher_temp (now "
            f"{self.args.teacher_temp}), --clip_grad (now {self.args.clip_grad}; 0 disables "
            f"clipping), --koleo_loss_weight (now {self.args.koleo_loss_weight}) and --use_fp16 "
            f"(now {self.args.use_fp16})."
        )

    def log_step(
        self, writer: Any, progress: Progress, rows: Tensor, epoch: int, first: int, record: bool
    ) -> None:
        """Console line, alarms and TensorBoard scalars for the steps since the last log
        (one host read of the window's signal rows)."""
        if not self.is_main:
            return
        its, per_step = progress.rate()
        step = epoch * self.niter + progress.step
        rows = rows.cpu()
        values = rows[:, 0].tolist()
        signals = LearningSignals.from_rows(rows, self.args.out_dim)
        active, fresh = self.alarms.check(signals, step, epoch)
        for alarm in fresh:
            print(f"WARNING [{alarm.kind} alarm] {alarm.message}", flush=True)
        gaug = self.teacher.backbone.gaug_statistics() if record else []
        means = (
            torch.stack([s[k] for s in gaug for k in ("var_mean", "alpha_mean")]).tolist()
            if gaug
            else []
        )
        lr, wd = float(self.lr_schedule[step]), float(self.wd_schedule[step])
        momentum = float(self.momentum_schedule[step])
        temp = self.dino_loss.teacher_temp(epoch)
        images_per_s = its * self.args.batch_size_per_gpu * self.env.world_size
        extra = {}
        if means:
            extra = {
                "gaug var": sum(means[0::2]) / len(gaug),
                "alpha": sum(means[1::2]) / len(gaug),
            }
        progress.log(
            its,
            per_step,
            loss=values[-1],
            **{
                "H(teacher)": f"{signals.teacher_entropy:.3f}/{signals.log_k:.3f}",
                "protos": signals.prototypes_in_use,
                "KL": signals.kl,
                **({"koleo": signals.koleo} if self.args.koleo_loss_weight else {}),
            },
            lr=lr,
            wd=wd,
            **extra,
            **{"img/s": images_per_s},
        )
        for offset, value in enumerate(values):
            writer.add_scalar("train/loss", value, epoch * self.niter + first + offset)
        for name, value in signals.as_dict().items():
            if name != "loss":
                writer.add_scalar(f"signals/{name}", value, step)
        kinds = {alarm.kind for alarm in active}
        for kind in ("uniform", "collapse"):
            writer.add_scalar(f"alarm/{kind}", float(kind in kinds), step)
        for alarm in fresh:
            writer.add_text(f"alarm/{alarm.kind}", alarm.message, step)
        for tag, value in (
            ("train/lr", lr),
            ("train/weight_decay", wd),
            ("train/momentum", momentum),
            ("train/teacher_temp", temp),
            ("perf/step_time_s", 1.0 / its),
            ("perf/images_per_s", images_per_s),
        ):
            writer.add_scalar(tag, value, step)
        for block, stat in enumerate(gaug):
            writer.add_scalar(f"gaug/var_mean/block{block:02d}", means[2 * block], step)
            writer.add_scalar(f"gaug/alpha_mean/block{block:02d}", means[2 * block + 1], step)
            writer.add_histogram(f"gaug/var/block{block:02d}", stat["var"].float().cpu(), step)
            writer.add_histogram(f"gaug/alpha/block{block:02d}", stat["alpha"].float().cpu(), step)

    def log_epoch(self, writer: Any, epoch: int, stats: dict[str, Any]) -> None:
        step = (epoch + 1) * self.niter - 1  # last step of the epoch: kept by purge_step
        writer.add_scalar("epoch/train_loss", stats["train_loss"], epoch)
        writer.add_scalar("epoch/images_per_s", stats["images_per_s"], epoch)
        vis_freq = self.args.vis_freq
        if vis_freq and ((epoch + 1) % vis_freq == 0 or epoch + 1 == self.args.epochs):
            from dino_locat.visualization import log_locality_figures

            transform = eval_transform(self.args.global_crops_size)
            count = min(VIS_IMAGES, len(self.images))
            batch = torch.stack([transform(self.images[i][0]) for i in range(count)])
            log_locality_figures(writer, self.teacher.backbone, batch, step)
        writer.flush()

    # -- reporting ------------------------------------------------------------------------
    def say(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def summary(self, stats: dict[str, Any] | None) -> dict[str, Any]:
        ckpt = str(self.checkpoint_path)
        tb = str(self.output_dir / "tensorboard")
        self.say(f"Checkpoint:  {ckpt}")
        self.say(f"TensorBoard: tensorboard --logdir {tb}")
        self.say(f"Next step:   {knn_command(self.args, ckpt)}")
        if not self.args.data_path and self.args.preset == "main":
            self.say(f"Longer runs: {LONGER_RUNS}")
        return {
            "output_dir": str(self.output_dir),
            "checkpoint": ckpt,
            "tensorboard": tb,
            "last_epoch": stats,
        }


def knn_command(args: argparse.Namespace, checkpoint: str) -> str:
    """The k-NN evaluation to run next; eval/knn.py reads arch, patch and image size from
    the checkpoint, and wants the folder that holds train/ and val/."""
    command = f"python eval/knn.py --pretrained_weights {checkpoint}"
    if args.data_path:
        folder = Path(args.data_path)
        root = str(folder.parent) if folder.name == "train" else "<folder with train/ and val/>"
        command += f" --data_path {root}"
    return command


def describe_run(args: argparse.Namespace, trainer: DinoTrainer, preset: dict[str, Any]) -> str:
    """The start-up banner: what will run, what the preset chose, where it goes."""
    env = trainer.env
    params = sum(p.numel() for p in trainer.student.backbone.parameters()) / 1e6
    lines = [
        f"DINO pretraining: {args.arch} ({params:.1f}M backbone parameters), "
        f"patch {args.patch_size}, 2x{args.global_crops_size}px + "
        f"{args.local_crops_number}x{args.local_crops_size}px crops, out_dim {args.out_dim}"
        + (f", {args.centering} targets" if args.centering != "centering" else "")
        + (f", KoLeo weight {args.koleo_loss_weight}" if args.koleo_loss_weight else ""),
        f"Data: {trainer.data_description}",
    ]
    if preset:
        chosen = " ".join(f"--{k} {v}" for k, v in preset.items())
        lines.append(
            f"No --data_path: CPU-sized Fashion-MNIST preset '{args.preset}' (any flag "
            f"overrides it): {chosen}"
        )
    precision = "fp16 autocast" if trainer.scaler is not None else "fp32"
    lines.append(
        f"Batch {args.batch_size_per_gpu} x {env.world_size} process(es) ({env.source}), "
        f"{trainer.niter} it/epoch, {args.epochs} epochs, peak lr {trainer.peak_lr:.3g}, "
        f"device {trainer.device}, {precision}"
    )
    start = f"resuming at epoch {trainer.start_epoch}" if trainer.start_epoch else "starting fresh"
    lines.append(f"Output: {args.output_dir} ({start})")
    return "\n".join(lines)


def build_trainer(args: argparse.Namespace) -> DinoTrainer:
    """Resolve the flags, join the process group, build (and resume) the run, print the plan."""
    args, preset = resolve_args(args)
    env, device = init_distributed()
    trainer = DinoTrainer(args, env, device)
    if env.is_main:
        print(describe_run(args, trainer, preset), flush=True)
        print("args: " + json.dumps(plain_args(args), sort_keys=True), flush=True)
    return trainer


def save_untrained(args: argparse.Namespace) -> dict[str, Any]:
    """Write the checkpoint a run with ``args`` starts from (epoch 0) without training a step.

    The untrained-network baseline of a comparison: the very code, seed and initialisation
    of a real run (teacher = student), so it differs from the trained run only by training.
    An existing checkpoint is left as it is.
    """
    trainer = build_trainer(args)
    if trainer.is_main and not trainer.checkpoint_path.is_file():
        trainer.save(0)
        trainer.say(f"Untrained network saved to {trainer.checkpoint_path}.")
    return {"checkpoint": str(trainer.checkpoint_path), "epoch": trainer.start_epoch}


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train DINO with ``args`` (from :func:`get_args_parser`); resumes from output_dir.

    Safe to call again after an interruption or a requeue: it continues from the last
    completed epoch in ``output_dir/checkpoint.pth`` (and does nothing if all are done).
    """
    return build_trainer(args).fit()
