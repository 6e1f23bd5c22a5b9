"""Is the run learning? Cheap signals from the teacher's distribution, and alarms.

Everything here comes from tensors the DINO step already holds (the teacher's centred,
sharpened softmax and the loss), so watching a run costs no extra forward. With K
prototypes (``out_dim``):

- per-image teacher entropy: ln K at a uniform start; a learning teacher makes confident
  per-image assignments, so it falls well below ln K;
- prototypes in use: exp of the entropy of the batch-mean teacher distribution; ~1 when
  every image lands on the same prototype (collapse);
- KL(teacher || student) = loss - teacher entropy (the loss is a cross-entropy over the
  cross-view pairs, and every teacher view enters the same number of pairs): what the
  student still has to learn; ~0 at the uniform start.

Collapse (few prototypes) and a teacher stuck at uniform (entropy ~ ln K with KL ~ 0) are
the two ways a DINO run fails quietly; :class:`AlarmMonitor` says so on the console.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Columns of the per-step signal rows the trainer accumulates (one row per step).
# ``koleo`` is the weighted KoLeo term (0 when --koleo_loss_weight is 0); ``loss`` is the
# DINO loss alone, so that KL = loss - teacher entropy holds with or without KoLeo.
SIGNAL_COLUMNS = ("loss", "teacher_entropy", "batch_entropy", "koleo")
# A teacher counts as near uniform above this fraction of ln K with KL below that fraction.
UNIFORM_ENTROPY_FRACTION = 0.9
UNIFORM_KL_FRACTION = 0.02
# Fewer prototypes in use than this (exp of the batch-mean entropy) counts as collapse.
COLLAPSE_PROTOTYPES = 3.0


def teacher_entropies(teacher_probs: Tensor) -> tuple[Tensor, Tensor]:
    """(mean per-image entropy, entropy of the batch-mean distribution), in nats.

    ``teacher_probs``: (rows, K) softmax outputs; stays on the device (no host sync).
    """
    probs = teacher_probs.float()
    per_image = -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1).mean()
    mean = probs.mean(dim=0)
    batch = -(mean * torch.log(mean.clamp_min(1e-30))).sum()
    return per_image, batch


@dataclass(frozen=True)
class LearningSignals:
    """Mean signals over a window of steps, for a head with ``out_dim`` prototypes."""

    loss: float
    teacher_entropy: float
    batch_entropy: float
    out_dim: int
    koleo: float = 0.0

    @classmethod
    def from_rows(cls, rows: Tensor, out_dim: int) -> LearningSignals:
        """Average (steps, columns) rows ordered as :data:`SIGNAL_COLUMNS` (one host read)."""
        loss, entropy, batch, *rest = rows.float().mean(dim=0).tolist()
        return cls(loss, entropy, batch, out_dim, *rest[:1])

    @property
    def log_k(self) -> float:
        return math.log(self.out_dim)

    @property
    def kl(self) -> float:
        """KL(teacher || student) averaged over the cross-view pairs."""
        return self.loss - self.teacher_entropy

    @property
    def prototypes_in_use(self) -> float:
        return math.exp(self.batch_entropy)

    @property
    def loss_fraction(self) -> float:
        """Loss / ln K: 1 at a uniform start."""
        return self.loss / self.log_k

    @property
    def entropy_fraction(self) -> float:
        return self.teacher_entropy / self.log_k

    def as_dict(self) -> dict[str, float]:
        """The values logged to the console, log.txt and TensorBoard."""
        return {
            "loss": self.loss,
            "teacher_entropy": self.teacher_entropy,
            "prototypes_in_use": self.prototypes_in_use,
            "kl_teacher_student": self.kl,
            "loss_over_lnK": self.loss_fraction,
            **({"koleo": self.koleo} if self.koleo else {}),
        }


@dataclass(frozen=True)
class Alarm:
    kind: str  # "uniform" or "collapse"
    message: str


def diagnose(signals: LearningSignals, flags: dict[str, object] | None = None) -> list[Alarm]:
    """The alarms these signals raise (empty for a healthy window).

    ``flags`` (current values of the flags people change) are quoted in the advice.
    """
    flags = flags or {}

    def now(name: str) -> str:
        return f"--{name}" + (f" (now {flags[name]})" if name in flags else "")

    alarms = []
    if (
        signals.entropy_fraction >= UNIFORM_ENTROPY_FRACTION
        and signals.kl <= UNIFORM_KL_FRACTION * signals.log_k
    ):
        alarms.append(
            Alarm(
                "uniform",
                f"the teacher stays near uniform: per-image entropy {signals.teacher_entropy:.3f}"
                f" of ln K = {signals.log_k:.3f}, KL(teacher||student) {signals.kl:.4f}; "
                "the run is not learning. Try a lower "
                f"{now('teacher_temp')}, a higher {now('lr')}, a lower "
                f"{now('momentum_teacher')} or a smaller {now('out_dim')}.",
            )
        )
    if signals.prototypes_in_use < COLLAPSE_PROTOTYPES:
        alarms.append(
            Alarm(
                "collapse",
                f"the teacher has collapsed onto {signals.prototypes_in_use:.2f} prototype(s) "
                f"of {signals.out_dim} (exp of the batch-mean entropy); features are "
                f"degenerate. Try a higher {now('momentum_teacher')}, a higher "
                f"{now('teacher_temp')}, a lower {now('lr')} or another {now('out_dim')}.",
            )
        )
    return alarms


def alarm_start_step(
    niter: int, epochs: int, warmup_epochs: float, warmup_teacher_temp_epochs: int
) -> int:
    """First global step at which alarms may fire: after the lr and teacher-temperature
    warm-ups, and never in the first 10% of the run (every run starts uniform)."""
    warmup = round(max(warmup_epochs, warmup_teacher_temp_epochs) * niter)
    return max(warmup, math.ceil(0.1 * epochs * niter), 1)


class AlarmMonitor:
    """Turns windows of signals into warnings, once warm-up is over.

    A warning is printed when an alarm starts and repeated at most once per epoch while it
    lasts, so a stuck run is reported without flooding the console.
    """

    def __init__(self, start_step: int, flags: dict[str, object]) -> None:
        self.start_step = start_step
        self.flags = flags
        self.reported: dict[str, int] = {}

    def check(
        self, signals: LearningSignals, step: int, epoch: int
    ) -> tuple[list[Alarm], list[Alarm]]:
        """(alarms active in the window ending at global ``step``, the ones to print now)."""
        if step < self.start_step:
            return [], []
        active = diagnose(signals, self.flags)
        kinds = {alarm.kind for alarm in active}
        for kind in list(self.reported):
            if kind not in kinds:
                del self.reported[kind]
        fresh = [alarm for alarm in active if self.reported.get(alarm.kind) != epoch]
        for alarm in fresh:
            self.reported[alarm.kind] = epoch
        return active, fresh
