"""Faults a long job meets, through the real entry points: killed workers, a kill mid-checkpoint, damaged
checkpoints, a full disk, a failing rank, W&B out of reach, a run directory that is not shared or that
another live run holds, a signal or a non-finite loss on one rank only.

Faults are placed exactly with LSTM_DIST_FAULT (lstm_dist/common/faults.py). What torchrun or a launch
script does about a failing rank goes through them; what the ranks agree on among themselves runs as
ranks started directly (conftest.run_ranks); a process that a fault kills, or that must outlive a moment
of the test, is a process of its own (conftest.Entry); a one-process run that the fault does not kill
runs in this process (conftest.train_here). Every launch runs in its own process group with a timeout,
and the group is killed if it runs over.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import (LAUNCH_TIMEOUT, ROOT, TINY, Entry, child_env, load_ckpt, losses, rank_envs, read_metrics,
                      run_entries, run_group, run_ranks, train_here)

pytestmark = pytest.mark.slow
IN_CI = os.environ.get("CI") == "true"
TIMEOUT = LAUNCH_TIMEOUT


def overrides(tmp: Path, corpus: Path, name: str, *extra: str) -> list[str]:
    return [*TINY, f"data.path={corpus}", f"run.dir={tmp}", f"run.name={name}", *extra]


def torchrun(nproc: int, *args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}", "-m", "lstm_dist.train", *args]


def alone(*args: str, cwd: Path, fault: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """One training process of its own (conftest.Entry, killed if it runs over), with the fault armed."""
    return run_entries("lstm_dist.train", [list(args)],
                       [{**child_env(), **(env or {}), **({"LSTM_DIST_FAULT": fault} if fault else {})}], cwd, TIMEOUT)


def launch(cmd: list[str], cwd: Path, fault: str | None = None, env: dict | None = None,
           timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run `cmd` in a process group of its own (killed whole if it runs over), with the fault armed."""
    return run_group(cmd, cwd, {**child_env(), **(env or {}), **({"LSTM_DIST_FAULT": fault} if fault else {})}, timeout)


def ranks(nproc: int, *args: str, cwd: Path, fault: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`nproc` training processes started without torchrun (conftest.run_ranks), with the fault armed: for
    what the ranks agree on among themselves. What torchrun does about a rank (restart it, end the others)
    is tested through torchrun."""
    return run_ranks(nproc, *args, cwd=cwd, env={**child_env(), **(env or {}), **({"LSTM_DIST_FAULT": fault} if fault else {})})


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def final(run_dir: Path, step: int) -> dict:
    return load_ckpt(run_dir / "checkpoints" / f"step_{step:08d}.pt")


def assert_same(a: dict, b: dict) -> None:
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][name]), (i, name)


@pytest.fixture(scope="module")
def straight1(tmp_path_factory, tiny_corpus) -> Path:
    """The same on one process (this one: conftest.train_here)."""
    tmp = tmp_path_factory.mktemp("straight1")
    ok(train_here(*overrides(tmp, tiny_corpus, "run", "train.steps=20", "checkpoint.every=5"), cwd=tmp))
    return tmp / "run"


# ---------------------------------------------------------------- crashes and kills


def test_a_sigkilled_worker_is_restarted_by_torchrun_and_the_run_ends_bit_identical(tmp_path, tiny_corpus, straight_run):
    # With torch 2.13, workers restarted by torchrun read their peers' addresses from the first attempt
    # out of the rendezvous store torchrun shares with them, and fail to connect (pytorch/pytorch#135712,
    # #167288); not sharing it is what a user of --max-restarts sets too (docs/faults.md).
    proc = ok(launch(torchrun(2, *overrides(tmp_path, tiny_corpus, "run", "train.steps=20", "checkpoint.every=5"),
                              restarts=1), cwd=tmp_path, fault="kill:step=12:rank=1",
                     env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}))
    assert "resumed from" in proc.stdout and "step_00000010.pt at step 10" in proc.stdout, proc.stdout
    assert_same(final(tmp_path / "run", 20), final(straight_run, 20))
    # metrics.jsonl holds every step once: the steps after the checkpoint were dropped and trained again
    steps = [m["step"] for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    assert steps == list(range(1, 21))
    assert losses(tmp_path / "run") == losses(straight_run)


@pytest.mark.parametrize("point", ["checkpoint-before-rename", "checkpoint-before-latest"])
def test_killed_while_writing_a_checkpoint_the_previous_one_survives(tmp_path, tiny_corpus, straight1, point):
    args = overrides(tmp_path, tiny_corpus, "run", "train.steps=20", "checkpoint.every=5")
    proc = alone(*args, cwd=tmp_path, fault=f"{point}:step=10")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    cdir = tmp_path / "run" / "checkpoints"
    assert (cdir / "latest").read_text().strip() == "step_00000005.pt"
    assert load_ckpt(cdir / "step_00000005.pt")["step"] == 5
    leftovers = [p.name for p in cdir.iterdir() if ".tmp." in p.name]
    assert bool(leftovers) == (point == "checkpoint-before-rename"), leftovers
    proc = ok(train_here(*args, cwd=tmp_path))
    assert f"resumed from {cdir / 'step_00000005.pt'} at step 5" in proc.stdout, proc.stdout
    assert not [p.name for p in cdir.iterdir() if ".tmp." in p.name], "a stale temporary file was left behind"
    assert_same(final(tmp_path / "run", 20), final(straight1, 20))


def test_a_damaged_checkpoint_is_refused_and_auto_falls_back_to_the_previous_one(tmp_path, tiny_corpus, straight1):
    shutil.copytree(straight1 / "checkpoints", tmp_path / "run" / "checkpoints")
    newest = tmp_path / "run" / "checkpoints" / "step_00000020.pt"
    newest.write_bytes(b"not a checkpoint, overwritten by something else\n" * 50)
    args = overrides(tmp_path, tiny_corpus, "run", "train.steps=20", "checkpoint.every=5")
    refused = train_here(*args, f"checkpoint.resume={newest}", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: checkpoint {newest} cannot be loaded: it is truncated or not a checkpoint (not the zip archive "
        "torch.save writes); use another checkpoint"]
    proc = ok(train_here(*args, cwd=tmp_path))
    assert f"warning: checkpoint {newest} cannot be loaded" in proc.stdout
    assert "falling back to the previous checkpoint" in proc.stdout
    assert "step_00000015.pt at step 15" in proc.stdout
    assert_same(final(tmp_path / "run", 20), final(straight1, 20))


@pytest.fixture
def small_disk():
    """A 500 KB tmpfs: room for one checkpoint of the tiny model (about 330 KB), not two."""
    where = Path(tempfile.mkdtemp(prefix="lstm_dist_full."))
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=500k", "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        where.rmdir()
        reason = f"cannot mount a small tmpfs here ({proc.stderr.strip() or 'not root'})"
        pytest.fail(reason) if IN_CI else pytest.skip(reason)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        where.rmdir()


def test_a_full_disk_stops_training_cleanly_and_keeps_the_last_checkpoint(tmp_path, tiny_corpus, small_disk):
    args = overrides(small_disk, tiny_corpus, "run", "train.steps=40", "checkpoint.every=5")
    proc = ranks(2, "--config", str(ROOT / "configs" / "smoke.yaml"), *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    cdir = small_disk / "run" / "checkpoints"
    assert re.match(rf"error: cannot write checkpoint step_(\d{{8}})\.pt in {re.escape(str(cdir))}: no space left "
                    rf"on device \(it needs about [\d,]+ bytes, [\d,]+ are free\)", errors[0]), errors[0]
    kept = (cdir / "latest").read_text().strip()
    assert load_ckpt(cdir / kept)["step"] == int(kept[5:13])
    assert not [p.name for p in cdir.iterdir() if ".tmp." in p.name]
    assert f"the last checkpoint, {kept}, is intact" in errors[0]


def test_a_crash_on_one_rank_ends_every_rank_promptly_with_its_message(tmp_path, tiny_corpus):
    # Ranks started directly: the other rank ends by itself (its collective sees the connection close),
    # without torchrun ending it (which the next test proves torchrun does too).
    t0 = time.monotonic()
    proc = ranks(2, *overrides(tmp_path, tiny_corpus, "run", "train.steps=100000"), cwd=tmp_path,
                 fault="raise:step=5:rank=1")
    assert proc.returncode != 0
    assert "RuntimeError: fault injected on rank 1 after step 5" in proc.stderr
    assert time.monotonic() - t0 < TIMEOUT


def test_a_killed_rank_ends_every_rank_promptly(tmp_path, tiny_corpus):
    proc = launch(torchrun(2, *overrides(tmp_path, tiny_corpus, "run", "train.steps=100000")), cwd=tmp_path,
                  fault="kill:step=5:rank=1")
    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL)" in proc.stderr or "SIGKILL" in proc.stderr, proc.stderr[-2000:]


def test_a_mistake_one_rank_meets_alone_is_printed_by_that_rank(tmp_path, tiny_corpus):
    proc = ranks(2, *overrides(tmp_path, tiny_corpus, "run", "train.steps=100000"), cwd=tmp_path,
                 fault="user-error:step=5:rank=1", env={"LSTM_DIST_EXIT_FILE": str(tmp_path / "status")})
    assert proc.returncode != 0
    line = "error: rank 1: fault injected on rank 1 after step 5 (a mistake one rank met alone)"
    assert proc.stderr.count(line) == 1, proc.stderr[-3000:]
    assert (tmp_path / "status").read_text().strip() == "2"


# ---------------------------------------------------------------- agreement


def test_a_non_finite_loss_on_one_rank_is_skipped_on_every_rank(tmp_path, tiny_corpus):
    proc = ok(ranks(2, *overrides(tmp_path, tiny_corpus, "run", "train.steps=10"), cwd=tmp_path,
                    fault="nonfinite:step=5:rank=1"))
    assert proc.stdout.count("non-finite loss or gradient") == 1
    assert "warning: step 5: non-finite loss or gradient" in proc.stdout
    logged = losses(tmp_path / "run")
    assert logged[5] is None and all(logged[s] is not None for s in range(1, 11) if s != 5)  # null: non-finite
    assert final(tmp_path / "run", 10)["nonfinite_total"] == 1


def test_a_compiled_step_failing_on_one_rank_mid_run_is_agreed_and_said_once(tmp_path, tiny_corpus):
    """A compiled step that raises on rank 1 in step 3 (recorded as `loops` records a real one): at the
    next log step (4) every rank learns it, runs uncompiled from there, and rank 0 says it once, naming
    the rank; the run goes on to the end."""
    proc = ok(ranks(2, *overrides(tmp_path, tiny_corpus, "run", "train.steps=8", "log.every=4"), cwd=tmp_path,
                    fault="compile-fails-later:step=3:rank=1"))
    said = [line for line in proc.stdout.splitlines() if "the compiled LSTM step failed" in line]
    assert said == ["warning: the compiled LSTM step failed on rank 1 by step 4 (injected by "
                    "LSTM_DIST_FAULT=compile-fails-later at step 3); this run's kernels (fp32, C++ CPU loops) "
                    "compile nothing (model.compile=false skips compiling)"], proc.stdout[-2000:]
    assert final(tmp_path / "run", 8)["step"] == 8


def test_a_stop_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, tiny_corpus):
    proc = ranks(2, "--config", str(ROOT / "configs" / "smoke.yaml"),
                 *overrides(tmp_path, tiny_corpus, "run", "train.steps=1000", "checkpoint.every=0"),
                 cwd=tmp_path, fault="preempt:step=6:rank=1")
    assert proc.returncode == 75, proc.stderr[-2000:]
    stopped = int(re.search(r"stop requested \(on another rank\): checkpointing at step (\d+)", proc.stdout).group(1))
    assert stopped == 7  # faults.py: the signal lands after step 6, the ranks agree on it at the end of step 7
    saved = final(tmp_path / "run", stopped)
    assert len({(r["stream"]["epoch"], r["stream"]["window"]) for r in saved["ranks"]}) == 1
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- what lies outside the job


@pytest.mark.parametrize("server", ["refuses", "never-answers"])
def test_wandb_out_of_reach_trains_on_offline_with_one_warning(tmp_path, tiny_corpus, server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        if server == "never-answers":
            s.listen(64)  # connections queue up, and nothing ever reads them
        else:
            s.close()
        t0 = time.monotonic()
        proc = ok(alone(*overrides(tmp_path, tiny_corpus, "run", "train.steps=5", "log.wandb.mode=online",
                                   "log.wandb.init_timeout=5"), cwd=tmp_path,
                        env={"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{port}",
                             "WANDB_DIR": str(tmp_path),
                             # wandb's own SDK telemetry (OpenTelemetry, to the same server) probes it at the
                             # process's exit, 2 × 10 s against one that never answers, after our run is
                             # saved: not what this test is about, and a test sends no telemetry anyway
                             "WANDB_ERROR_REPORTING": "false"}))
        elapsed = time.monotonic() - t0
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "W&B" in warnings[0] and "offline" in warnings[0], proc.stdout + proc.stderr
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "the run was not logged offline"
    assert elapsed < TIMEOUT


def test_a_run_directory_the_nodes_do_not_share_is_refused(tmp_path, tiny_corpus):
    # Two nodes of one process each, as multinode.sh starts them (RANK 0 and 1, LOCAL_RANK 0 on each), each
    # in its own working directory: a relative run.dir is a different directory on each.
    args = ["--config", str(ROOT / "configs" / "smoke.yaml"), *TINY, f"data.path={tiny_corpus}", "run.dir=runs",
            "train.steps=5"]
    nodes = []
    for env in rank_envs(2):
        rank = env["RANK"]
        (tmp_path / f"node{rank}").mkdir()
        nodes.append(Entry("lstm_dist.train", args, tmp_path / f"node{rank}",
                           {**env, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}))
    try:
        for node in nodes:
            node.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError("a node hung") from None
    finally:
        for node in nodes:
            node.kill()
            node.wait()
    assert [p.returncode for p in nodes] == [2, 2], [(p.stdout, p.stderr) for p in nodes]
    errors = [line for p in nodes for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: run directory runs/smoke is not shared by every node: rank 1 (on {socket.gethostname()}) "
                      "cannot see the file rank 0 wrote there; put run.dir on a file system every node mounts "
                      "(NFS, Lustre, ...)"], [(p.stdout, p.stderr) for p in nodes]
    assert not list((tmp_path / "node0" / "runs" / "smoke").glob("checkpoints/*"))


def test_a_second_live_run_in_the_same_directory_is_refused_but_a_dead_ones_lock_is_not(tmp_path, tiny_corpus):
    args = overrides(tmp_path, tiny_corpus, "run", "checkpoint.every=0")
    first = Entry("lstm_dist.train", [*args, "train.steps=100000"], tmp_path, child_env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((tmp_path / "run" / "metrics.jsonl").exists() and read_metrics(tmp_path / "run")):
            assert time.monotonic() < deadline and first.poll() is None, "the first run did not start training"
            time.sleep(0.2)
        second = train_here(*args, "train.steps=5", cwd=tmp_path)
        assert second.returncode == 2
        assert second.stderr.strip() == (
            f"error: run directory {tmp_path / 'run'} is in use by another run (host {socket.gethostname()}, "
            f"pid {first.pid}); wait for it to end or stop it, or choose another run.name")
        assert first.poll() is None, "the first run was disturbed"
    finally:
        first.kill()
        first.wait()
    ok(train_here(*args, "train.steps=5", cwd=tmp_path))  # the dead run's lock does not block


def test_a_rank_that_stops_answering_fails_the_job_after_the_collective_timeout(tmp_path, tiny_corpus):
    # Ranks started directly: what is tested is that train.collective_timeout reaches the process group and
    # a rank waiting on a silent peer ends with an error. That torchrun then ends the job (the silent rank
    # too, SIGKILL 30 s after its SIGTERM) is what it does for any failed rank (the crash test above).
    args = overrides(tmp_path, tiny_corpus, "run", "train.steps=100000", "train.collective_timeout=5")
    envs = rank_envs(2, {**child_env(), "LSTM_DIST_FAULT": "hang:step=5:rank=1"})
    waiting, silent = (Entry("lstm_dist.train", args, tmp_path, env) for env in envs)
    try:
        t0 = time.monotonic()
        assert waiting.wait(TIMEOUT) != 0, waiting.stdout
        elapsed = time.monotonic() - t0
        assert silent.poll() is None, "the silent rank was meant to be still asleep"
    finally:
        for proc in (waiting, silent):
            proc.kill()
            proc.wait()
    assert "timed out" in waiting.stderr.lower(), waiting.stderr[-3000:]
    assert elapsed < TIMEOUT
    assert losses(tmp_path / "run") and max(losses(tmp_path / "run")) == 5  # it trained up to the silence


def test_a_rank_that_cannot_compile_makes_every_rank_fall_back_together(tmp_path, tiny_corpus):
    proc = ok(ranks(2, *overrides(tmp_path, tiny_corpus, "run", "train.steps=2", "model.compile=true"),
                    cwd=tmp_path, fault="compile-fails:rank=1"))
    lines = [line for line in proc.stdout.splitlines() if "torch.compile of the LSTM step failed" in line]
    assert lines == ["warning: torch.compile of the LSTM step failed on rank 1 (injected by "
                     "LSTM_DIST_FAULT=compile-fails); every rank runs the eager step"], proc.stdout[-2000:]
    assert final(tmp_path / "run", 2)["step"] == 2


def test_a_rank_without_the_cpu_loops_makes_every_rank_run_the_eager_loops(tmp_path, tiny_corpus):
    from lstm_dist.model import cpu_loops

    if cpu_loops.get() is None:
        pytest.skip(f"the C++ loops cannot be built here ({cpu_loops.failure()}); nothing to fall back from")
    run = lambda name, **kw: ok(ranks(2, *overrides(tmp_path, tiny_corpus, name, "train.steps=2"),  # noqa: E731
                                      cwd=tmp_path, **kw))
    proc = run("fallback", fault="cpu-loops-fail:rank=1")
    lines = [line for line in proc.stdout.splitlines() if "C++ LSTM loops" in line]
    assert lines == ["warning: the C++ LSTM loops are not available on rank 1 (injected by "
                     "LSTM_DIST_FAULT=cpu-loops-fail); every rank runs the eager loops (slower on the CPU, "
                     "the same numbers to ~5e-7)"], proc.stdout[-2000:]
    # both ranks really ran the eager loops: bit for bit what a run with them switched off everywhere
    # computes, and not what the C++ loops compute
    run("eager", env={"LSTM_DIST_CPU_LOOPS": "0"})
    run("cpp")
    fallback, eager, cpp = (final(tmp_path / name, 2)["model"] for name in ("fallback", "eager", "cpp"))
    assert all(torch.equal(fallback[k], eager[k]) for k in eager)
    assert not all(torch.equal(cpp[k], eager[k]) for k in eager)
