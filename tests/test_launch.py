"""The launch scripts for real: two 'nodes' on loopback through launch/multinode.sh, and bad input."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest
import torch

from conftest import LAUNCH_TIMEOUT, ROOT, TINY, child_env, load_ckpt, run_group

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_by_hand_train_like_one_node_with_two_processes(tmp_path, tiny_corpus):
    args = [str(ROOT / "configs" / "smoke.yaml"), *TINY, f"data.path={tiny_corpus}", "train.steps=6"]
    port = free_port()
    nodes = [
        subprocess.Popen([str(ROOT / "launch" / "multinode.sh"), *args, f"run.dir={tmp_path / 'nodes'}"], cwd=tmp_path,
                         env={**child_env(), "NNODES": "2", "NODE_RANK": str(r), "NPROC": "1",
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for r in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=LAUNCH_TIMEOUT)[0] for p in nodes]
    except subprocess.TimeoutExpired:
        for p in nodes:
            os.killpg(p.pid, signal.SIGKILL)
        raise
    assert [p.returncode for p in nodes] == [0, 0], outs
    assert "on 2 process(es)" in outs[0]
    assert outs[0].splitlines()[0].startswith("+ torchrun --nnodes=2 --nproc_per_node=1 --node_rank=0")
    single = run_group([str(ROOT / "launch" / "torchrun.sh"), *args, f"run.dir={tmp_path / 'single'}"],
                       cwd=tmp_path, env={**child_env(), "NPROC": "2"})
    assert single.returncode == 0, single.stdout + single.stderr
    assert single.stderr.startswith("+ torchrun --standalone --nproc_per_node=2 -m lstm_dist.train")
    a = load_ckpt(tmp_path / "nodes" / "smoke" / "checkpoints" / "step_00000006.pt")
    b = load_ckpt(tmp_path / "single" / "smoke" / "checkpoints" / "step_00000006.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("script, env, expected", [
    ("torchrun.sh", {}, "error: config file nope.yaml not found; pass one of configs/*.yaml"),
    ("multinode.sh", {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"},
     "error: config file nope.yaml not found; pass one of configs/*.yaml"),
    ("multinode.sh", {}, "error: NNODES is not set; set NNODES, NODE_RANK and MASTER_ADDR (see launch/multinode.sh --help)"),
])
def test_launchers_refuse_bad_input_in_one_line(tmp_path, script, env, expected):
    proc = subprocess.run([str(ROOT / "launch" / script), "nope.yaml"], cwd=tmp_path, env={**child_env(), **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == expected


def test_a_user_error_through_the_launcher_is_one_line_and_its_status(tmp_path):
    # The config exists, so the launcher starts torchrun; training refuses the key. torchrun must not
    # bury that line under its own report of a failed worker, and the script exits 2, not torchrun's 1.
    proc = run_group([str(ROOT / "launch" / "torchrun.sh"), str(ROOT / "configs" / "smoke.yaml"), "model.hiden=8"],
                     cwd=tmp_path, env={**child_env(), "NPROC": "2"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("+ ")]
    assert lines[-1] == "error: unknown key 'model.hiden'; did you mean 'model.hidden'?", proc.stderr
    assert proc.stderr.count("model.hiden") == 2  # the echoed command and the one error line
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr
