"""Optimiser-side pieces of the DINO step: parameter groups, per-tensor clipping,
the frozen last layer, and the teacher EMA."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module) -> list[dict]:
    """Two AdamW groups: weights (decayed), biases and 1-D norm/gain tensors (not)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.ndim == 1 else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients_per_tensor(model: nn.Module, clip: float) -> None:
    """Scale each parameter's gradient to an L2 norm of at most ``clip``.

    Done with tensor ops only (no ``.item()``), so it never waits for the device.
    """
    for param in model.parameters():
        if param.grad is not None:
            norm = param.grad.norm(2)
            param.grad.mul_((clip / (norm + 1e-6)).clamp(max=1.0))


def drop_last_layer_grads(model: nn.Module) -> None:
    """Keep the head's last layer fixed (DINO freezes it during the first epoch(s))."""
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA ``teacher <- m * teacher + (1 - m) * student`` over all parameters."""
    student_params = dict(student.named_parameters())
    for name, t_param in teacher.named_parameters():
        t_param.mul_(momentum).add_(student_params[name].detach(), alpha=1.0 - momentum)
