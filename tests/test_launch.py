"""The launch scripts for real: two 'nodes' on loopback through launch/multinode.sh, a stop signal, a
port in use, and bad input."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import LAUNCH_TIMEOUT, ROOT, TINY, child_env, descendants, free_port, load_ckpt, read_metrics, run_group

pytestmark = pytest.mark.slow


def test_two_nodes_by_hand_train_like_one_node_with_two_processes(tmp_path, tiny_corpus, straight_run):
    # smoke.yaml with TINY is conftest.straight_run's settings (TINY overrides every setting in which the two
    # differ, but for the checkpoint cadence, which moves no number): two processes on one machine
    args = [str(ROOT / "configs" / "smoke.yaml"), *TINY, f"data.path={tiny_corpus}", "train.steps=20"]
    port = free_port()
    nodes = [
        subprocess.Popen([str(ROOT / "launch" / "multinode.sh"), *args, f"run.dir={tmp_path / 'nodes'}"], cwd=tmp_path,
                         env={**child_env(), "NNODES": "2", "NODE_RANK": str(r), "NPROC_PER_NODE": "1",
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
    assert outs[0].splitlines()[0].startswith("+ python3 -m lstm_dist.rendezvous torchrun --nnodes=2 --nproc_per_node=1 "
                                              "--node_rank=0")
    a = load_ckpt(tmp_path / "nodes" / "smoke" / "checkpoints" / "step_00000020.pt")
    b = load_ckpt(straight_run / "checkpoints" / "step_00000020.pt")
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


@pytest.mark.parametrize("script", ["torchrun.sh", "multinode.sh"])
def test_launchers_help_is_their_usage_and_exit_0(tmp_path, script):
    proc = subprocess.run([str(ROOT / "launch" / script), "--help"], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"Usage: launch/{script} [--config] CONFIG [section.key=value ...]"
    assert "NPROC_PER_NODE" in proc.stdout and "NPROC, its old name, still works" in proc.stdout
    assert not any(line.startswith(("#", "set -")) for line in lines)  # the comment, not the code
    assert subprocess.run([str(ROOT / "launch" / script), "-h"], cwd=tmp_path, env=child_env(), capture_output=True,
                          text=True, timeout=60).stdout == proc.stdout
    bare = subprocess.run([str(ROOT / "launch" / script)], cwd=tmp_path, env=child_env(), capture_output=True,
                          text=True, timeout=60)
    assert (bare.returncode, bare.stdout) == (2, "")
    assert bare.stderr == (f"error: no config file; run launch/{script} CONFIG [section.key=value ...], e.g. "
                           f"launch/{script} configs/smoke.yaml (see launch/{script} --help)\n")


@pytest.mark.parametrize("args, env, expected", [
    # --config FILE and --config=FILE, as lstm_dist.train takes them
    (["--config", "nope.yaml", "train.steps=3"], {"NPROC_PER_NODE": "1"},
     "error: config file nope.yaml not found; pass one of configs/*.yaml"),
    (["--config=nope.yaml"], {"NPROC_PER_NODE": "1"}, "error: config file nope.yaml not found; pass one of configs/*.yaml"),
    (["a.yaml", "--config", "b.yaml"], {}, "error: two config files, a.yaml and b.yaml; pass one (its settings can be "
                                           "overridden with section.key=value)"),
    # NPROC_PER_NODE is torchrun's name (and slurm/train.sh's); NPROC, the old one, is still read
    (["{smoke}"], {"NPROC_PER_NODE": "two"}, "error: NPROC_PER_NODE=two is not a number of processes per node; set "
                                             "NPROC_PER_NODE to a positive integer (e.g. NPROC_PER_NODE=2) or leave it "
                                             "unset for one per GPU"),
    (["{smoke}"], {"NPROC": "two"}, "error: NPROC=two is not a number of processes per node; set NPROC_PER_NODE to a "
                                    "positive integer (e.g. NPROC_PER_NODE=2) or leave it unset for one per GPU"),
    (["{smoke}"], {"NPROC": "1", "NPROC_PER_NODE": "2"},
     "error: NPROC=1 and NPROC_PER_NODE=2 disagree; set NPROC_PER_NODE only (NPROC is its old name)"),
])
def test_launcher_config_option_and_process_count_names(tmp_path, args, env, expected):
    args = [a.format(smoke=ROOT / "configs" / "smoke.yaml") for a in args]
    base = {k: v for k, v in child_env().items() if k not in ("NPROC", "NPROC_PER_NODE")}
    proc = subprocess.run([str(ROOT / "launch" / "torchrun.sh"), *args], cwd=tmp_path, env={**base, **env},
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (2, expected + "\n")


def test_a_user_error_through_the_launcher_is_one_line_and_its_status(tmp_path):
    # The config exists, so the launcher starts torchrun; training refuses the key. torchrun must not
    # bury that line under its own report of a failed worker, and the script exits 2, not torchrun's 1.
    proc = run_group([str(ROOT / "launch" / "torchrun.sh"), str(ROOT / "configs" / "smoke.yaml"), "model.hiden=8"],
                     cwd=tmp_path, env={**child_env(), "NPROC": "2"})  # the old name of NPROC_PER_NODE, still read
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # the launcher says what it runs: torchrun kept out of the stop signals, which the script relays
    assert proc.stderr.startswith("+ torchrun --standalone --nproc_per_node=2 --signals-to-handle=SIGHUP,SIGQUIT "
                                  "-m lstm_dist.train"), proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("+ ")]
    assert lines[-1] == "error: unknown key 'model.hiden'; did you mean 'model.hidden'?", proc.stderr
    assert proc.stderr.count("model.hiden") == 2  # the echoed command and the one error line
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------ stopping a launcher


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_stop_signal_to_a_launcher_checkpoints_and_ends_without_torchruns_traceback(tmp_path, tiny_corpus):
    # Two instances at once (they share nothing, and overlap their start-up on the machine's cores):
    # SIGUSR1 to launch/torchrun.sh, SIGTERM to launch/multinode.sh. Each must reach the training processes
    # themselves, not torchrun: torchrun turns a stop signal into a shutdown that kills the workers 30 s
    # later and ends in a 28-line SignalException traceback after the run's own last line.
    cases = {
        "torchrun.sh": (signal.SIGUSR1, {"NPROC_PER_NODE": "1"}),
        "multinode.sh": (signal.SIGTERM, {"NPROC_PER_NODE": "1", "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                          "MASTER_PORT": str(free_port())}),
    }
    procs = {}
    try:
        for script, (_, env) in cases.items():
            # Far more steps than the test needs: the stop must come from the signal.
            args = [str(ROOT / "configs" / "smoke.yaml"), *TINY, f"data.path={tiny_corpus}", "train.steps=3000",
                    "checkpoint.every=0", f"run.dir={tmp_path / script}"]
            procs[script] = subprocess.Popen([str(ROOT / "launch" / script), *args], cwd=tmp_path,
                                             env={**child_env(), **env}, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        waiting = dict(procs)
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while waiting:  # once a launcher's run has trained a few steps, stop it
            for script, proc in list(waiting.items()):
                metrics = tmp_path / script / "smoke" / "metrics.jsonl"
                if metrics.exists() and any(m.get("step", 0) >= 3 for m in read_metrics(metrics.parent) if "train/loss" in m):
                    os.kill(proc.pid, cases[script][0])
                    del waiting[script]
                assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"{list(waiting)} did not train 3 steps in {LAUNCH_TIMEOUT:.0f}s"
            time.sleep(0.1)
        results = {script: (proc.communicate(timeout=LAUNCH_TIMEOUT), proc.returncode)
                   for script, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                kill_tree(proc)
    for script, ((out, err), status) in results.items():
        name = signal.Signals(cases[script][0]).name
        both = out + err
        assert status == 75, both
        # torchrun never took the signal: no shutdown of its workers, no traceback of its own.
        assert "Traceback" not in both and "SignalException" not in both, both
        assert "death signal" not in both and "closing signal" not in both, both
        stopped = re.search(rf"stop requested \({name}\): checkpointing at step (\d+) and exiting with 75", out)
        step = int(stopped.group(1))
        saved = load_ckpt(tmp_path / script / "smoke" / "checkpoints" / f"step_{step:08d}.pt")
        assert saved["step"] == step
        assert err.count(f"[launch/{script}] {name}: every training process checkpoints at its next step and exits "
                         "with 75\n") == 1, err


# ------------------------------------------------------------------ a port in use


def test_a_port_in_use_is_one_line_naming_it_and_master_port(tmp_path, tiny_corpus):
    # What another job on this node would hold: a listening socket. Two instances of the kind at once:
    # multinode.sh's node 0 (torchrun's rendezvous), and a run outside torchrun whose process group listens
    # on MASTER_PORT (MASTER_ADDR set, as in a shell prepared for multinode.sh).
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = [*TINY, f"data.path={tiny_corpus}", "train.steps=2"]
        env = {**child_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmds = {
            "multinode.sh": ([str(ROOT / "launch" / "multinode.sh"), str(ROOT / "configs" / "smoke.yaml"), *args,
                              f"run.dir={tmp_path / 'multinode'}"],
                             {**env, "NNODES": "1", "NODE_RANK": "0", "NPROC_PER_NODE": "1"}, "the rendezvous (node 0)",
                             "set MASTER_PORT to a free port, the same on every node"),
            "train": ([sys.executable, "-m", "lstm_dist.train", "--config", str(ROOT / "configs" / "smoke.yaml"),
                       *args, f"run.dir={tmp_path / 'train'}"], env, "the process group's store",
                      "set MASTER_PORT to a free port"),
        }
        procs = {k: subprocess.Popen(cmd, cwd=tmp_path, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True) for k, (cmd, e, _, _) in cmds.items()}
        try:
            results = {k: (p.communicate(timeout=LAUNCH_TIMEOUT), p.returncode) for k, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    kill_tree(p)
        for k, ((out, err), status) in results.items():
            _, _, what, fix = cmds[k]
            assert status == 2, out + err
            assert [line for line in err.splitlines() if not line.startswith("+ ")] == [
                f"error: port {port} (MASTER_PORT) is in use on this node, by another job or program, so {what} "
                f"cannot listen there; {fix}"], err
            assert "Traceback" not in out + err
        # The holder is untouched: still listening, and nobody connected to it.
        holder.setblocking(False)
        with pytest.raises(BlockingIOError):
            holder.accept()
        assert holder.getsockname()[1] == port


def test_a_master_port_that_is_no_port_or_missing_is_one_line(tmp_path, monkeypatch):
    # Two more instances of the kind, said before anything listens: multinode.sh's MASTER_PORT, and a process
    # group outside torchrun (MASTER_ADDR set, MASTER_PORT not, or not a number).
    proc = subprocess.run([str(ROOT / "launch" / "multinode.sh"), str(ROOT / "configs" / "smoke.yaml")], cwd=tmp_path,
                          env={**child_env(), "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                               "NPROC_PER_NODE": "1", "MASTER_PORT": "http"}, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (2, "error: MASTER_PORT=http is not a TCP port number; set MASTER_PORT "
                                                 "to a free port from 1024 to 65535, the same on every node\n")
    from lstm_dist.common.distributed import setup
    from lstm_dist.common.errors import UserError

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(UserError, match=r"^a process group needs MASTER_ADDR and MASTER_PORT, but MASTER_PORT is not "
                                        r"set; launch with torchrun"):
        with setup("cpu"):
            pass
    monkeypatch.setenv("MASTER_PORT", "99999")
    with pytest.raises(UserError, match=r"^MASTER_PORT='99999' is not a TCP port number"):
        with setup("cpu"):
            pass
