"""slurm/train.sh on a real two-node Slurm cluster: each node a network namespace with its own address.

The cluster (tests/slurm_cluster.sh) is brought up once for the whole test run, since slurmctld takes
port 6817 on every address, and torn down at the end whatever happened. Jobs run the real script, the
real srun and torchrun, and real training processes; their weights are compared with a run of the
same world size on this machine, which must give the same numbers bit for bit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, child_env, load_ckpt, read_metrics, run_train

CLUSTER = ROOT / "tests" / "slurm_cluster.sh"
SCRIPTS = [ROOT / "slurm" / "train.sh", CLUSTER, ROOT / "tests" / "gpu_check.sh", *sorted((ROOT / "launch").glob("*.sh"))]
IN_CI = os.environ.get("CI") == "true"
# One cluster per machine (slurmctld takes port 6817, the namespaces have fixed names): every test of
# this file runs on the same pytest-xdist worker, one after another (pyproject: --dist loadfile).


def skip_or_fail(reason: str):
    """Where the machine lacks something, skip locally with the reason; in CI nothing may be skipped."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def test_scripts_pass_bash_n_and_shellcheck():
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    if shutil.which("shellcheck") is None:
        skip_or_fail("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_outside_a_job_the_script_says_how_to_submit_it(tmp_path):
    env = {k: v for k, v in child_env().items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "train.sh"), "configs/smoke.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: not inside a Slurm job; submit it: sbatch slurm/train.sh CONFIG "
                                   "[section.key=value ...]")


def test_help_is_the_comment_block_and_the_config_may_be_given_as_train_takes_it(tmp_path):
    env = {k: v for k, v in child_env().items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "train.sh"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith("lstm_dist on a Slurm cluster:") and "NPROC_PER_NODE" in proc.stdout
    assert not any(line.startswith(("#SBATCH", "SBATCH", "set -")) for line in proc.stdout.splitlines())
    # --config FILE / --config=FILE, as lstm_dist.train and the launch scripts take it (a job's environment
    # faked far enough to reach the config check)
    for args in (["--config", "nope.yaml"], ["--config=nope.yaml"], ["nope.yaml"]):
        proc = subprocess.run(["bash", str(ROOT / "slurm" / "train.sh"), *args, "train.steps=3"], cwd=tmp_path,
                              env={**env, "SLURM_JOB_ID": "1", "SLURM_SUBMIT_DIR": str(tmp_path)},
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and proc.stderr.strip() == (
            f"error: config file nope.yaml not found in {tmp_path}; pass one of configs/*.yaml, relative to the "
            "directory you submit from"), proc.stderr


# ------------------------------------------------------------------ the cluster


@pytest.fixture(scope="module")
def slurm():
    """A running two-node cluster: the environment that points Slurm's clients at it."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        skip_or_fail("Slurm is not installed (apt-get install --no-install-recommends slurmctld slurmd "
                     "slurm-client munge)")
    # Not under pytest's own temporary directory: that is private to root, and munged runs as munge.
    state = Path(tempfile.mkdtemp(prefix="lstm_dist_slurm."))
    env = {**child_env(), "LSTM_DIST_SLURM_STATE": str(state)}
    up = subprocess.run([str(CLUSTER), "up"], env=env, capture_output=True, text=True, timeout=120)
    if up.returncode == 3:
        skip_or_fail(up.stderr.strip())
    if up.returncode != 0:
        # Also a cluster someone started by hand: reported, and left as it is.
        subprocess.run([str(CLUSTER), "down"], env=env, capture_output=True, timeout=120) \
            if "already" not in up.stderr else None
        pytest.fail(f"the test cluster did not come up:\n{up.stderr}")
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run([str(CLUSTER), "down"], env=env, capture_output=True, timeout=120)


def sbatch(slurm_env: dict, cwd: Path, *args: str, nproc: int, nodes: int, options: tuple[str, ...] = (),
           **env: str) -> tuple[str, Path]:
    log = cwd / "job-%j.out"
    proc = subprocess.run(["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--time=10",
                           f"--output={log}", *options, str(ROOT / "slurm" / "train.sh"), *args],
                          cwd=ROOT, env={**slurm_env, "NPROC_PER_NODE": str(nproc), **env},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    return job, cwd / f"job-{job}.out"


def job_info(slurm_env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], env=slurm_env, capture_output=True, text=True,
                         timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(slurm_env: dict, job: str, done, what: str, timeout: float = 60) -> dict[str, str]:
    """Poll the job (sbatch --wait is slow) until done(info) holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(slurm_env, job)
        if done(info):
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job} not {what} within {timeout:.0f}s: {job_info(slurm_env, job)}")


def finished(info: dict[str, str]) -> bool:
    return info.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_ckpt(run_dir / "checkpoints" / f"step_{step:08d}.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def job_args(corpus: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    # The smoke config made tiny; one thread per process, so that a rank computes the same on a
    # Slurm node as under a plain torchrun on this machine.
    return ["configs/smoke.yaml", *TINY, f"data.path={corpus}", f"run.dir={run_dir.parent}",
            f"run.name={run_dir.name}", f"train.steps={steps}", *extra]


def standalone(corpus: Path, run_dir: Path, steps: int, *extra: str) -> dict[str, torch.Tensor]:
    """The final weights of the same run on two processes of this machine (conftest.run_train)."""
    args = job_args(corpus, run_dir, steps, *extra)
    run_train(2, "--config", str(ROOT / args[0]), *args[1:], cwd=run_dir.parent.parent)
    return final_weights(run_dir, steps)



@pytest.fixture(scope="module")
def plain_20(straight_run) -> dict[str, torch.Tensor]:
    """The final weights of two processes on this machine after 20 steps (conftest.straight_run, the same
    settings but for its checkpoint cadence, which moves no number): what every job must match."""
    return final_weights(straight_run, 20)


@pytest.mark.slow
def test_two_nodes_train_like_one_torchrun_and_the_log_ends_cleanly(slurm, tmp_path, tiny_corpus, plain_20):
    job, log = sbatch(slurm, tmp_path, *job_args(tiny_corpus, tmp_path / "runs" / "slurm", 20), nproc=1, nodes=2)
    info = wait_for(slurm, job, finished, "finished")
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), text
    assert "2 node(s) (node1 node2) × 1 process(es); rendezvous at node1:" in text
    assert re.search(r"on 2 process\(es\) \((node1: rank [01]; node2: rank [01])\)", text), text
    assert text.count("rendezvous store listening") == 1
    # A clean end: no traceback of any node, no error line, and the script's own last word.
    assert "Traceback" not in text and "error" not in text.lower(), text
    assert text.rstrip().splitlines()[-1] == "[slurm/train.sh] training finished"
    assert_same_weights(final_weights(tmp_path / "runs" / "slurm", 20), plain_20)


@pytest.mark.slow
def test_the_same_script_runs_two_processes_on_one_node(slurm, tmp_path, tiny_corpus, plain_20):
    job, log = sbatch(slurm, tmp_path, *job_args(tiny_corpus, tmp_path / "runs" / "one", 20), nproc=2, nodes=1)
    info = wait_for(slurm, job, finished, "finished")
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert "1 node(s) (node1) × 2 process(es)" in text
    assert "(node1: ranks 0-1)" in text
    assert_same_weights(final_weights(tmp_path / "runs" / "one", 20), plain_20)


def warn_when_training(slurm_env: dict, job: str, log: Path, run_dir: Path, after_step: int = 20) -> None:
    """Once the job has trained a few steps, send the warning signal the way Slurm does before the time limit."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and \
                any(m.get("step", 0) >= after_step for m in read_metrics(run_dir) if "train/loss" in m):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the job did not train {after_step} steps in time:\n{log.read_text() if log.exists() else ''}")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env, check=True, timeout=30)


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_ends_bit_identical(slurm, tmp_path, tiny_corpus):
    steps = 200
    run_dir = tmp_path / "runs" / "pre"
    extra = ["checkpoint.every=0", "log.wandb.mode=offline"]
    job, log = sbatch(slurm, tmp_path, *job_args(tiny_corpus, run_dir, steps, *extra), nproc=1, nodes=2)
    warn_when_training(slurm, job, log, run_dir)

    info = wait_for(slurm, job, lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING", "requeued")
    text = log.read_text()
    stopped = int(re.search(r"checkpointing at step (\d+) and exiting with 75", text).group(1))
    assert 20 <= stopped < steps
    saved = load_ckpt(run_dir / "checkpoints" / f"step_{stopped:08d}.pt")
    # Both nodes stopped at the same step boundary: every rank's stream is at the same window.
    assert len(saved["ranks"]) == 2
    assert len({(r["stream"]["epoch"], r["stream"]["window"]) for r in saved["ranks"]}) == 1
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("step_*.pt"))] == [f"step_{stopped:08d}.pt"]
    assert f"requeueing job {job} (1 of at most 20)" in text

    # Slurm holds a requeued job back about two minutes; start it now, as an operator would, but not within
    # the second of the requeue: slurmd refuses a job launched then ("Job credential revoked") and it fails.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True, timeout=30)
    info = wait_for(slurm, job, finished, "finished")
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert "start 2 (requeued 1 time(s))" in text
    assert re.search(rf"resumed from \S+step_{stopped:08d}\.pt at step {stopped}\b", text), text
    assert "Traceback" not in text, text
    assert text.rstrip().splitlines()[-1] == "[slurm/train.sh] training finished"
    # One W&B run across the requeue: both starts logged to the same offline run id.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(run_id) for name in offline), offline

    assert_same_weights(final_weights(run_dir, steps), standalone(tiny_corpus, tmp_path / "plain" / "pre", steps, *extra))


@pytest.mark.slow
def test_a_user_error_is_not_requeued_and_ends_the_log_in_one_line(slurm, tmp_path, tiny_corpus):
    job, log = sbatch(slurm, tmp_path, *job_args(tiny_corpus, tmp_path / "runs" / "typo", 10, "model.hiden=64"),
                      nproc=1, nodes=2)
    info = wait_for(slurm, job, finished, "finished")
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), text
    last = text.rstrip().splitlines()[-1]
    assert last.startswith("error: ") and "model.hiden" in last, text
    assert text.count("model.hiden") == 2, text  # the echoed command line, and the one error line
    assert "Traceback" not in text and "requeueing" not in text, text


@pytest.mark.slow
def test_requeues_stop_at_the_cap_with_a_clear_line(slurm, tmp_path, tiny_corpus):
    run_dir = tmp_path / "runs" / "cap"
    # one node: the cap is the batch script's, whatever the job's size
    job, log = sbatch(slurm, tmp_path, *job_args(tiny_corpus, run_dir, 200, "checkpoint.every=0"), nproc=1, nodes=1,
                      MAX_REQUEUES="0")
    warn_when_training(slurm, job, log, run_dir)
    info = wait_for(slurm, job, finished, "finished")
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "0"), text
    assert text.rstrip().splitlines()[-1] == (
        "[slurm/train.sh] stopped after writing a checkpoint; not requeued: this job was already requeued 0 time(s) "
        "(MAX_REQUEUES=0); resubmit the same command to continue")
    assert len(list((run_dir / "checkpoints").glob("step_*.pt"))) == 1


def test_the_rendezvous_store_refuses_bad_arguments_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "lstm_dist.rendezvous", "node1", "http"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: usage: python -m lstm_dist.rendezvous HOST PORT (this node's address for "
                                   "the other nodes, and a TCP port number, 1-65535)")


# What another job sharing node1 would hold: a listening socket on every address of node1's network namespace
# (tests/slurm_cluster.sh names it lsd-node1). It prints its port, then, when its stdin closes, whether anybody
# connected to it meanwhile.
HOLD_PORT = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 0)); s.listen()
print(s.getsockname()[1], flush=True)
sys.stdin.read()
s.setblocking(False)
try:
    s.accept(); print("connected")
except BlockingIOError:
    print("untouched")
"""


@pytest.mark.slow
def test_a_rendezvous_port_in_use_on_the_node_ends_the_job_in_one_line(slurm, tmp_path, tiny_corpus):
    holder = subprocess.Popen(["nsenter", "--net=/run/netns/lsd-node1", sys.executable, "-c", HOLD_PORT],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(holder.stdout.readline())
        job, log = sbatch(slurm, tmp_path, *job_args(tiny_corpus, tmp_path / "runs" / "port", 10), nproc=1, nodes=1,
                          options=("--nodelist=node1",), MASTER_PORT=str(port))
        info = wait_for(slurm, job, finished, "finished")
        text = log.read_text()
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), text
        assert text.rstrip().splitlines()[-1] == (
            f"error: port {port} (MASTER_PORT) is in use on this node, by another job or program, so the rendezvous "
            "store cannot listen there; set MASTER_PORT to a free port for this job"), text
        # Nothing was started against the port: no torchrun, no training process, no traceback.
        assert "+ srun" not in text and "Traceback" not in text and "requeueing" not in text, text
        out, _ = holder.communicate("", timeout=30)
        assert out.strip() == "untouched"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


@pytest.mark.slow
def test_scancel_checkpoints_every_rank_and_is_not_requeued(slurm, tmp_path, tiny_corpus):
    run_dir = tmp_path / "runs" / "cancel"
    job, log = sbatch(slurm, tmp_path, *job_args(tiny_corpus, run_dir, 5000, "checkpoint.every=0"), nproc=1, nodes=2)
    deadline = time.monotonic() + 60
    while not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 20):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.2)
    subprocess.run(["scancel", job], env=slurm, check=True, timeout=30)  # SIGTERM to every process of the job
    info = wait_for(slurm, job, finished, "finished")
    text = log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), text
    # scancel signals every process of the job; the rank that sees it first decides the step, so rank 0
    # may say it heard it from another rank
    stopped = int(re.search(r"stop requested \((?:SIGTERM|on another rank)\): checkpointing at step (\d+)", text).group(1))
    saved = load_ckpt(run_dir / "checkpoints" / f"step_{stopped:08d}.pt")
    assert len({(r["stream"]["epoch"], r["stream"]["window"]) for r in saved["ranks"]}) == 1
    assert text.rstrip().splitlines()[-1].startswith("[slurm/train.sh] stopped by SIGTERM after writing a checkpoint; "
                                                    "not requeued by this script")
