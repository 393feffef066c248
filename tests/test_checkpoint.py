"""Checkpoint files: retention, the `latest` pointer, and the generator states a checkpoint carries."""

from __future__ import annotations

import random

import numpy as np
import torch

from lstm_dist.training import checkpoint as ckpt


def test_retention_keeps_the_newest_keep_and_latest_names_the_newest(tmp_path):
    for step in (5, 10, 15, 20, 25):
        path = ckpt.save(tmp_path, step, {"model": {"w": torch.full((2,), float(step))}}, keep=2)
        assert path.name == ckpt.file_name(step)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000020.pt", "step_00000025.pt"]
    assert (ckpt.checkpoint_dir(tmp_path) / ckpt.LATEST).read_text().strip() == "step_00000025.pt"
    newest = ckpt.load(ckpt.resolve(tmp_path))
    assert newest["step"] == 25 and torch.equal(newest["model"]["w"], torch.full((2,), 25.0))
    # keep=1 after more were kept: only the newest stays
    ckpt.save(tmp_path, 30, {"model": {}}, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000030.pt"]


def test_generators_come_back_from_a_saved_state(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = ckpt.rng_state(torch.device("cpu"))
    first = (torch.rand(3), np.random.rand(3), random.random())
    path = ckpt.save(tmp_path, 1, {"model": {}, "rng": state}, keep=1)  # through a weights_only file
    ckpt.set_rng_state(ckpt.load(path)["rng"], torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
