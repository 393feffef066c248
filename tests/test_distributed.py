"""The launch environment's rules (lstm_dist/common/distributed.py): which GPU a process takes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from lstm_dist.common.distributed import gpu_index, pick_device
from lstm_dist.common.errors import UserError


@pytest.mark.parametrize("local_rank, local_world, visible, assigned, index", [
    (0, 8, 8, False, 0),  # torchrun --nproc_per_node=8: every process sees the node's GPUs
    (7, 8, 8, False, 7),
    (3, 4, 8, False, 3),  # fewer processes than GPUs
    (7, 8, 8, True, 7),  # CUDA_VISIBLE_DEVICES narrowing the node's GPUs for the whole job
    (0, 1, 1, False, 0),  # one process, one GPU
    (1, 2, 1, True, 0),  # one GPU of its own per process (Slurm --gpus-per-task=1): GPU 0 on every rank
    (5, 8, 1, True, 0),
])
def test_each_process_takes_its_gpu(local_rank, local_world, visible, assigned, index):
    assert gpu_index(local_rank, local_world, visible, assigned) == index


@pytest.mark.parametrize("local_rank, local_world, visible, assigned", [
    (1, 2, 1, False),  # two processes, one GPU that both see
    (2, 4, 2, False),  # more processes than GPUs
    (3, 4, 2, True),
])
def test_gpus_that_do_not_go_round_are_one_line(local_rank, local_world, visible, assigned):
    with pytest.raises(UserError) as info:
        gpu_index(local_rank, local_world, visible, assigned)
    assert str(info.value) == (
        f"local rank {local_rank} of {local_world} processes on this node sees {visible} GPU(s), not one of its "
        f"own; start at most {visible} process(es) per node (--nproc_per_node), or give each process one GPU "
        "(CUDA_VISIBLE_DEVICES, Slurm's --gpus-per-task=1)")


def test_the_cpu_and_auto_without_a_gpu():
    assert pick_device("cpu", 3, local_world=4) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device("auto", 1, local_world=2) == torch.device("cpu")
        with pytest.raises(UserError, match=r"^train.device=cuda but no CUDA GPU is visible"):
            pick_device("cuda")


@pytest.mark.cuda
def test_one_visible_gpu_per_process_on_a_gpu():
    """What Slurm's --gpus-per-task=1 gives local rank 1 of 2: one visible GPU, and it is cuda:0."""
    code = ("import torch; from lstm_dist.common.distributed import pick_device; "
            "print(pick_device('cuda', 1, local_world=2), torch.cuda.device_count())")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cuda:0", "1"]
