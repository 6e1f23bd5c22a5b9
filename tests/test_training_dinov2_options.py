"""DINOv2's KoLeo regulariser and Sinkhorn-Knopp targets, as options of the DINO step."""

from __future__ import annotations

import copy
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import tiny_training_argv

from dino_locat.training import get_args_parser
from dino_locat.training.loop import build_trainer
from dino_locat.training.loss import DINOLoss, koleo_loss, sinkhorn_knopp
from dino_locat.training.optim import (
    clip_gradients_per_tensor,
    drop_last_layer_grads,
    update_teacher,
)


def test_koleo_matches_a_hand_computed_value():
    # Normalised rows a=(1,0), b=(0,1), c=(1,1)/sqrt2: a's and b's neighbour is c, c's is a
    # (ties go to the first); every distance is sqrt(2 - sqrt2).
    x = torch.tensor([[3.0, 0.0], [0.0, 0.5], [2.0, 2.0]])
    expected = -math.log(math.sqrt(2 - math.sqrt(2)) + 1e-8)
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-6)


def test_koleo_of_duplicates_is_finite_and_needs_two_rows():
    value = koleo_loss(torch.ones(4, 8))
    assert torch.isfinite(value) and value.item() > 10  # log of a distance near 1e-8
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.ones(1, 8))


def test_sinkhorn_knopp_rows_sum_to_one_and_prototypes_share_the_mass():
    torch.manual_seed(0)
    teacher = torch.randn(64, 16) * 0.5
    q = sinkhorn_knopp(teacher, teacher_temp=1.0)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-6)
    # Each prototype gets B / K of the mass, up to 3 iterations' convergence.
    assert torch.allclose(q.sum(dim=0), torch.full((16,), 64 / 16), rtol=1e-2)
    # Against the plain softmax, the batch is spread more evenly.
    soft = torch.softmax(teacher, dim=-1)
    assert q.sum(dim=0).std() < soft.sum(dim=0).std() / 10


def test_sinkhorn_knopp_survives_a_sharp_teacher():
    q = sinkhorn_knopp(torch.randn(32, 256).clamp(-1, 1), teacher_temp=0.02)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(32), atol=1e-5)


def test_sinkhorn_loss_leaves_the_centre_alone_and_centering_moves_it():
    student, teacher = torch.randn(8, 32), torch.randn(4, 32)
    sk = DINOLoss(32, 4, 0.04, 0.04, 0, 1, centering="sinkhorn_knopp")
    sk(student, teacher, 0)
    assert sk.center.abs().sum() == 0 and set(sk.state_dict()) == {"center"}
    plain = DINOLoss(32, 4, 0.04, 0.04, 0, 1)
    plain(student, teacher, 0)
    assert plain.center.abs().sum() > 0
    with pytest.raises(ValueError, match="--centering"):
        DINOLoss(32, 4, 0.04, 0.04, 0, 1, centering="mean")


RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from dino_locat.training.loss import sinkhorn_knopp
rank = int(sys.argv[2])
dist.init_process_group("gloo", init_method=sys.argv[3], rank=rank, world_size=2)
torch.manual_seed(0)
teacher = torch.randn(12, 40).clamp(-1, 1)
q = sinkhorn_knopp(teacher[rank * 6 : (rank + 1) * 6], 0.05)
torch.save(q, f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_two_gloo_processes_get_the_targets_of_one_process_with_the_whole_batch(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(tmp_path), str(rank), init],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(outputs)
    torch.manual_seed(0)
    whole = sinkhorn_knopp(torch.randn(12, 40).clamp(-1, 1), 0.05)
    halves = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in range(2)])
    assert torch.allclose(halves, whole, rtol=1e-6, atol=1e-9)


def fixed_crops(trainer) -> list[torch.Tensor]:
    crops, _ = next(iter(trainer.loader))
    return crops


def test_koleo_weight_zero_is_the_plain_dino_step_and_a_weight_changes_it(tmp_path):
    """The trainer's step with --koleo_loss_weight 0 equals, bit for bit, a DINO step
    written out here (student forward, DINO loss, clip, AdamW, EMA); a weight changes it."""

    def trainer(weight: float):
        argv = tiny_training_argv(
            tmp_path / f"w{weight}",
            subset=16,
            drop_path_rate=0.0,
            freeze_last_layer=1,
            koleo_loss_weight=weight,
        )
        return build_trainer(get_args_parser().parse_args(argv))

    plain = trainer(0.0)
    crops = fixed_crops(plain)
    student, teacher = copy.deepcopy(plain.student), copy.deepcopy(plain.teacher)
    loss_fn = copy.deepcopy(plain.dino_loss)
    mapping = dict(zip(plain.student.parameters(), student.parameters(), strict=True))
    optimizer = torch.optim.AdamW(
        [
            {**group, "params": [mapping[p] for p in group["params"]]}
            for group in plain.optimizer.param_groups
        ]
    )

    signals = plain.train_step(crops, 0, 0, False)

    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = float(plain.lr_schedule[0])
        if index == 0:
            group["weight_decay"] = float(plain.wd_schedule[0])
    with torch.no_grad():
        teacher_output = teacher(crops[:2])
    loss = loss_fn(student(crops), teacher_output, 0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients_per_tensor(student, plain.args.clip_grad)
    drop_last_layer_grads(student)  # epoch 0 < --freeze_last_layer 1
    optimizer.step()
    update_teacher(student, teacher, float(plain.momentum_schedule[0]))

    assert signals[0].item() == loss.item() and signals[-1].item() == 0.0
    for (name, a), b in zip(
        plain.student.state_dict().items(), student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    for (name, a), b in zip(
        plain.teacher.state_dict().items(), teacher.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name

    weighted = trainer(1.0)
    signals = weighted.train_step(crops, 0, 0, False)
    assert signals[-1].item() > 0
    moved = [
        not torch.equal(a, b)
        for a, b in zip(weighted.student.parameters(), plain.student.parameters(), strict=True)
    ]
    assert any(moved)
