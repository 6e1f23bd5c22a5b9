"""Two real processes over gloo keep one teacher; rank layout from torchrun/SLURM vars."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import tiny_training_argv

from dino_locat.distributed import DistEnv, parse_first_host, resolve_environment

RANK_SCRIPT = """
import sys, torch
from dino_locat.training import get_args_parser
from dino_locat.training.loop import build_trainer
trainer = build_trainer(get_args_parser().parse_args(sys.argv[2:]))
trainer.fit()
torch.save({"teacher": trainer.teacher.state_dict(), "student": trainer.student.state_dict(),
            "center": trainer.dino_loss.center, "world": trainer.env.world_size}, sys.argv[1])
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_keep_the_teacher_identical(tmp_path):
    out = tmp_path / "dino"
    # Embedded Fashion-MNIST default: 32 images, 2 ranks x batch 4 -> 4 steps per epoch.
    argv = tiny_training_argv(out, subset=32, epochs=2, warmup_epochs=1)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        dump = tmp_path / f"rank{rank}.pt"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK_SCRIPT, str(dump), *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(outputs)
    assert "Batch 4 x 2 process(es) (torchrun/env), 4 it/epoch" in outputs[0]
    assert "Epoch [" not in outputs[1]  # only rank 0 prints progress
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert states[0]["world"] == states[1]["world"] == 2
    for name, value in states[0]["teacher"].items():
        assert torch.equal(value, states[1]["teacher"][name]), name
    for name, value in states[0]["student"].items():
        assert torch.equal(value, states[1]["student"][name]), name
    assert torch.equal(states[0]["center"], states[1]["center"])
    assert states[0]["center"].abs().sum() > 0
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    for name, value in ckpt["teacher"].items():
        assert torch.equal(value, states[0]["teacher"][name]), name


def test_environment_from_torchrun_variables():
    env = resolve_environment(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "node7",
            "MASTER_PORT": "1234",
        }
    )
    assert env == DistEnv(3, 8, 1, "node7", 1234, "torchrun/env")
    assert resolve_environment({}) == DistEnv()


def test_environment_from_slurm_variables():
    env = resolve_environment(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[012-015]",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert env.master_addr == "gpu012" and env.master_port == 10000 + 123456 % 20000
    assert env.source == "SLURM" and not env.is_main
    with pytest.raises(ValueError, match="SLURM_NTASKS"):
        resolve_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "two"})


def test_slurm_node_list_parsing():
    assert parse_first_host("node[003-005,009],cpu1") == "node003"
    assert parse_first_host("login1,login2") == "login1"
    assert parse_first_host("host") == "host"


PEER_SCRIPT = """
import os, sys, torch
from dino_locat.distributed import all_reduce_sum, describe_peer_failure, init_distributed
from dino_locat.distributed import is_peer_failure
env, _ = init_distributed()
if env.rank == 1:
    os._exit(9)  # dies without a word, as a killed process does
try:
    for _ in range(1000):
        all_reduce_sum(torch.ones(4))
except RuntimeError as err:
    print("peer failure:", is_peer_failure(err), describe_peer_failure(err, 0, 2), flush=True)
"""


def rank_env(rank: int, port: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def test_a_dead_rank_is_named_not_waited_for():
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PEER_SCRIPT],
            env=rank_env(rank, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    out = procs[0].communicate(timeout=300)[0]
    procs[1].communicate(timeout=60)
    assert procs[1].returncode == 9
    host = socket.gethostname()
    assert f"peer failure: True rank 0 of 2 on node {host}: another rank (of 1 on {host})" in out


def test_a_rank_that_never_comes_times_out_with_its_name():
    env = rank_env(0, str(free_port()), DINO_LOCAT_DIST_TIMEOUT_S="2")
    script = "from dino_locat.distributed import init_distributed; init_distributed()"
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "DistributedError: rank 0 of 2 on node" in proc.stderr
    assert "within 2 s (DINO_LOCAT_DIST_TIMEOUT_S)" in proc.stderr
