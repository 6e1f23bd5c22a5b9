"""DINO's self-distillation loss with a centred, sharpened teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_locat.distributed import all_reduce_sum, is_distributed
from dino_locat.schedules import cosine_schedule
from dino_locat.training.signals import teacher_entropies


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's centred, sharpened softmax over the global
    views and the student's softmax over every other view.

    ``center`` (a buffer, so it is in ``state_dict()``) is an EMA of the batch mean of
    the teacher outputs, averaged over all ranks: ``c <- m c + (1 - m) mean(t)``.
    The teacher temperature warms up linearly per epoch, then stays constant.

    After each call ``last_signals`` holds (loss, mean per-image teacher entropy, entropy of
    the batch-mean teacher distribution), detached and on the device: the learning
    signals of :mod:`dino_locat.training.signals`, from the softmax this loss computes anyway.
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
    ) -> None:
        super().__init__()
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
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

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int) -> Tensor:
        """``student_output``: (ncrops * B, K); ``teacher_output``: (2 * B, K), view-major."""
        student = (student_output.float() / self.student_temp).chunk(self.ncrops)
        teacher_probs = F.softmax(
            (teacher_output.float() - self.center) / self.teacher_temp(epoch), dim=-1
        ).detach()
        teacher = teacher_probs.chunk(2)
        total, terms = student_output.new_zeros((), dtype=torch.float32), 0
        for t_index, q in enumerate(teacher):
            for s_index, s in enumerate(student):
                if s_index == t_index:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
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
