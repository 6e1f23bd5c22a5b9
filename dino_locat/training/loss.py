"""DINO's self-distillation loss, with DINOv2's two small-batch tools as options.

- The teacher's targets: DINO's centred, sharpened softmax (``centering``, the default), or
  DINOv2's Sinkhorn-Knopp normalisation (``sinkhorn_knopp``), which spreads each batch
  evenly over the prototypes instead of relying on an EMA centre.
- :func:`koleo_loss`: DINOv2's KoLeo regulariser, which pushes a batch's embeddings apart
  (a differential entropy estimate from nearest-neighbour distances).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_locat.distributed import all_reduce_sum, is_distributed
from dino_locat.schedules import cosine_schedule
from dino_locat.training.signals import teacher_entropies

CENTERINGS = ("centering", "sinkhorn_knopp")
SINKHORN_ITERATIONS = 3
KOLEO_EPS = 1e-8


def sinkhorn_knopp(
    teacher_output: Tensor, teacher_temp: float, iterations: int = SINKHORN_ITERATIONS
) -> Tensor:
    """Teacher targets whose rows sum to 1 and whose prototype columns carry equal mass.

    ``Q = exp(t / T)^T`` (K x B) is scaled to a total of 1, then alternately each prototype
    row is made to sum to 1/K and each sample column to 1/B; B counts the rows of every
    process (the sums are all-reduced), so N processes give the targets of one process
    holding the whole batch. Computed in float64: ``exp(t / T)`` at T = 0.02 spans
    e^{+-50} for unit-norm logits, where float32 sums lose the small entries.
    """
    q = torch.exp(teacher_output.double() / teacher_temp).t()
    total_rows = q.new_tensor(float(q.shape[1]))
    all_reduce_sum(total_rows)
    prototypes = q.shape[0]
    q = q / all_reduce_sum(q.sum().reshape(1))
    for _ in range(iterations):
        q = q / all_reduce_sum(q.sum(dim=1, keepdim=True)) / prototypes
        q = q / q.sum(dim=0, keepdim=True) / total_rows
    return (q * total_rows).t().float()


def koleo_loss(features: Tensor, eps: float = KOLEO_EPS) -> Tensor:
    """KoLeo: ``-mean_i log(||x_i - x_nn(i)|| + eps)`` over L2-normalised rows.

    ``x_nn(i)`` is the row with the largest dot product with ``x_i`` other than itself.
    The distance carries its own ``eps`` inside the norm (as torch's pairwise distance
    does), so duplicated rows give a finite value. Computed in float32; needs >= 2 rows.
    """
    if len(features) < 2:
        raise ValueError("KoLeo needs at least 2 samples per batch")
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # below any cosine: a row is never its own neighbour
        nearest = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
        return -torch.log(distances + eps).mean()


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's targets over the global views and the
    student's softmax over every other view.

    ``center`` (a buffer, so it is in ``state_dict()`` whichever targets are used) is an
    EMA of the batch mean of the teacher outputs, averaged over all ranks:
    ``c <- m c + (1 - m) mean(t)``; Sinkhorn-Knopp targets neither use nor update it.
    The teacher temperature warms up linearly per epoch, then stays constant.

    After each call ``last_signals`` holds (loss, mean per-image teacher entropy, entropy of
    the batch-mean teacher distribution), detached and on the device: the learning
    signals of :mod:`dino_locat.training.signals`, from the targets this loss computes anyway.
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "centering",
    ) -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"--centering {centering!r}: choose from {', '.join(CENTERINGS)}")
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temps = cosine_schedule(
            teacher_temp,
            teacher_temp,
            nepochs,
            1,
            warmup_epochs=min(warmup_teacher_temp_epochs, nepochs),
            start_warmup_value=warmup_teacher_temp,
        )

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])

    @torch.no_grad()
    def teacher_targets(self, teacher_output: Tensor, epoch: int) -> Tensor:
        """Per-row target distributions (2 * B, K) for ``teacher_output`` (2 * B, K)."""
        temp = self.teacher_temp(epoch)
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_output.float(), temp)
        return F.softmax((teacher_output.float() - self.center) / temp, dim=-1)

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int) -> Tensor:
        """``student_output``: (ncrops * B, K); ``teacher_output``: (2 * B, K), view-major."""
        student = (student_output.float() / self.student_temp).chunk(self.ncrops)
        teacher_probs = self.teacher_targets(teacher_output, epoch)
        teacher = teacher_probs.chunk(2)
        total, terms = student_output.new_zeros((), dtype=torch.float32), 0
        for t_index, q in enumerate(teacher):
            for s_index, s in enumerate(student):
                if s_index == t_index:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        if self.centering == "centering":
            self.update_center(teacher_output)
        loss = total / terms
        self.last_signals = torch.stack([loss.detach(), *teacher_entropies(teacher_probs)])
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        batch_sum = teacher_output.float().sum(dim=0, keepdim=True)
        count = teacher_output.new_tensor(float(len(teacher_output)), dtype=torch.float32)
        if is_distributed():
            stacked = torch.cat([batch_sum.flatten(), count.view(1)])
            all_reduce_sum(stacked)
            batch_sum, count = stacked[:-1].view_as(batch_sum), stacked[-1]
        batch_mean = batch_sum / count
        self.center.mul_(self.center_momentum).add_(batch_mean * (1 - self.center_momentum))
