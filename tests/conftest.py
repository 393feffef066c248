"""Shared helpers for the end-to-end tests: a small corpus of our own text, and real launches."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lstm_dist.common.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]

# A tiny model and layout so that real multi-process runs take seconds on 2 cores.
TINY = [
    "model.embedding=16", "model.hidden=32", "model.layers=2", "model.compile=false",
    "train.batch_size=4", "train.bptt=16", "train.warmup_steps=2", "train.lr=0.01",
    "train.eval_every=0", "train.sample_chars=20", "train.device=cpu", "train.threads=1",
    "log.every=1", "log.wandb.mode=disabled", "checkpoint.keep=10",
]

_WORDS = ("the of and to in is was for on as with by at from that his her an which it are were this be "
          "river city house music film game station church school island model state war team king light "
          "north south early later first second small large old new open long short").split()


def make_text(n_chars: int, seed: int) -> str:
    """Deterministic English-looking text (our own, generated): words, commas, sentences, lines."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", ",", ";"]) + (" " if rng.random() < 0.8 else "\n")
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_chars]


def prepare_corpus(dest: Path, train_chars: int = 1000, eval_chars: int = 400, vocab: str = "bytes") -> Path:
    from lstm_dist.data.prepare import prepare

    src = dest.parent / (dest.name + "-src")
    src.mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate((("train", train_chars), ("valid", eval_chars), ("test", eval_chars))):
        (src / f"{split}.txt").write_text(make_text(n, seed=i), encoding="utf-8")
    return prepare("files", dest, vocab=vocab, quiet=True, train=src / "train.txt", valid=src / "valid.txt",
                   test=src / "test.txt")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    return env


def train_cmd(nproc: int, *overrides: str) -> list[str]:
    """The real entry point: torchrun with `nproc` processes, plain python for 1, torchrun with one process for -1."""
    if nproc == 1:
        return [sys.executable, "-m", "lstm_dist.train", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={abs(nproc)}",
            "-m", "lstm_dist.train", *overrides]


# A tiny run's launch takes seconds; a launch that runs over this has hung, and its whole process group
# (torchrun, its workers, a launch script's children) is killed so that nothing outlives the test. A
# guard against a hang, not a speed limit: the suite runs one test per core (pytest-xdist), so a launch
# shares its cores with another test's, and the slowest (a rank that hangs, waited out by the collective
# timeout and torchrun's 30 s grace) takes about 45 s alone.
LAUNCH_TIMEOUT = 120.0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children's children too), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def finish(proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> tuple[str, str]:
    """Wait for a process started with start_new_session=True; on a timeout kill its group and fail."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The group, and every descendant that left it (torchrun starts its workers in sessions of their
        # own): one of those would hold the pipes open and communicate() would wait for ever.
        stray = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in stray:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, proc.args[:6]))}... ran over {timeout:.0f}s and was killed\n"
                             f"stdout:\n{(out or '')[-3000:]}\nstderr:\n{(err or '')[-3000:]}") from None


def run_group(cmd: list[str], cwd: Path, env: dict | None = None,
              timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """Run `cmd` in a process group of its own, capturing its output; on a timeout kill the group and fail."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    out, err = finish(proc, timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(nproc: int, *overrides: str, cwd: Path, env: dict | None = None,
              timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """`nproc` training processes started directly, as torchrun's workers are (RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT in their environment), without torchrun itself: the
    same code path in every rank for one process fewer (torchrun's own start-up costs as much CPU as a
    rank's). For tests of training, not of torchrun; those launch torchrun (`train_cmd`). stdout and
    stderr are the ranks', rank 0's first; the status is the first non-zero one. A launch that runs over
    `timeout` has every rank's process group killed and fails the test."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        rank_env = {**(env or child_env()), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                    "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "lstm_dist.train", *overrides], cwd=cwd, env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    try:  # read every rank's pipes at once: a rank blocked on a full pipe would stall the others' collectives
        with concurrent.futures.ThreadPoolExecutor(nproc) as pool:
            outs = list(pool.map(lambda p: finish(p, timeout), procs))
    finally:
        for proc in procs:  # a rank left waiting for one that failed its launch
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    code = next((p.returncode for p in procs if p.returncode != 0), 0)
    return subprocess.CompletedProcess(["lstm_dist.train", *overrides], code, "".join(o for o, _ in outs),
                                       "".join(e for _, e in outs))


def train_here(*overrides: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m lstm_dist.train OVERRIDES` run by its real main() in this process, in `cwd`, with
    `env` added to the environment: its status, stdout and stderr as a subprocess's would be. For a
    one-process run whose command line the launch tests already prove: a process of its own would only
    import torch again (seconds of CPU). What the trainer changes for the process (torch's threads, the
    working directory, the environment) is put back."""
    from lstm_dist import train
    from lstm_dist.common import faults

    out, err = io.StringIO(), io.StringIO()
    threads, here, saved = torch.get_num_threads(), os.getcwd(), dict(os.environ)
    os.environ.update(env or {})
    os.chdir(cwd)
    faults._spec.cache_clear()  # a process reads LSTM_DIST_FAULT once: this run reads its own
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_cli(train.main, list(overrides))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(saved)
        faults._spec.cache_clear()
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["lstm_dist.train", *overrides], code, out.getvalue(), err.getvalue())


def run_train(nproc: int, *overrides: str, cwd: Path, timeout: float = LAUNCH_TIMEOUT,
              check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """A training run: 1 in this process (`train_here`), n > 1 ranks started directly (`run_ranks`),
    -n under torchrun (`train_cmd`: the path a job takes, a process group even for one process)."""
    if nproc == 1:
        proc = train_here(*overrides, cwd=cwd, env=env)
    elif nproc > 1:
        proc = run_ranks(nproc, *overrides, cwd=cwd, timeout=timeout, env=env and {**child_env(), **env})
    else:
        proc = run_group(train_cmd(nproc, *overrides), cwd=cwd, env=env and {**child_env(), **env}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return prepare_corpus(tmp_path_factory.mktemp("corpus") / "tiny")


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, tiny_corpus) -> Path:
    """The run directory of 20 steps on 2 ranks (TINY: 7 windows an epoch, so it crosses epoch boundaries),
    a checkpoint every 5: what every interrupted, killed or resumed 2-rank run of the tests must end as,
    bit for bit. Trained once per test session (per pytest-xdist worker)."""
    tmp = tmp_path_factory.mktemp("straight")
    run_train(2, *TINY, f"data.path={tiny_corpus}", f"run.dir={tmp}", "run.name=straight", "train.steps=20",
              "checkpoint.every=5", cwd=tmp)
    return tmp / "straight"


def pytest_collection_modifyitems(config, items):
    """`cuda` tests skip, with the reason, where no GPU is visible; `pytest -m cuda` runs them on one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); run `pytest -m cuda` on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
