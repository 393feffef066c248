"""Shared helpers for the end-to-end tests: a small corpus of our own text, and real launches."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import io
import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

from lstm_dist.common.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]

# The CPU matrix products' measurements (lstm_dist.model.products) go to a cache of the test session's own
# (made by the first process that imports this file; xdist's workers and every run they start inherit
# it): the tests never read or write the user's ~/.cache/lstm_dist, and the session measures a shape once.
if "LSTM_DIST_CACHE" not in os.environ:
    os.environ["LSTM_DIST_CACHE"] = tempfile.mkdtemp(prefix="lstm_dist_cache_")
    atexit.register(shutil.rmtree, os.environ["LSTM_DIST_CACHE"], ignore_errors=True)

# One torch thread in the test processes themselves (the runs they start set theirs: child_env, train.threads).
# The suite runs 3 xdist workers and their subprocesses on 2 cores; with torch's default of a thread per core,
# OpenMP's waiting threads fight the other processes for the cores: a float64 gradcheck that takes 2 s alone
# took 25-40 s so. A test that needs more threads sets them itself (as test_evaluate's and test_bench's do).
torch.set_num_threads(1)

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


# ---------------------------------------------------------------- processes of our entry points, forked
#
# Most of a tiny run's process is interpreter start-up: importing torch (~2.5 s of CPU here) and
# torch._dynamo (~2.3 s more: torch.optim's step imports it). A test that needs separate processes of
# an entry point (the ranks of a run, a process a fault kills) gets them forked from a server that
# imported those once per pytest worker (multiprocessing's fork server: a clean single-threaded
# process, not the pytest worker). Each is a real process of its own, with its own pid, session,
# environment, working directory, stdout and stderr, running the entry point's real main() through
# run_cli exactly as `python -m lstm_dist.X` does; only the imports are shared. The command lines
# themselves, torchrun and the launch scripts are tested as they are, in processes started from scratch.

_FORK = multiprocessing.get_context("forkserver")
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "lstm_dist.train", "lstm_dist.evaluate", "conftest"]


def _entry_main(module: str, argv: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """In the forked process: become what `python -m MODULE ARGV` is (a session of its own, `cwd`, exactly
    `env`, stdout and stderr to the files `out` and `err`, unbuffered), run the module's main() through
    run_cli, and exit as the interpreter would: status of SystemExit, 1 and the traceback for any other
    exception, atexit handlers run."""
    os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, errors="backslashreplace")
    sys.argv = [module, *argv]
    try:
        run_cli(importlib.import_module(module).main, list(argv))
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    os._exit(code)


def _fork_server_started() -> None:
    """The fork server of this pytest worker, with torch and our entry points imported (once; ~5 s)."""
    if getattr(_fork_server_started, "done", False):
        return
    _FORK.set_forkserver_preload(_PRELOAD)
    saved = dict(os.environ)
    os.environ.update(child_env())  # what the server's imports see (OpenMP reads OMP_NUM_THREADS on loading)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    _fork_server_started.done = True


class Entry:
    """`python -m MODULE ARGV` in `cwd` with exactly `env`, as a forked process (see above): `pid` (also
    its process group's), `poll()`, `wait(timeout)`, `returncode` (minus the signal's number when a signal
    ended it, as subprocess says), and `stdout` / `stderr` once it has ended."""

    def __init__(self, module: str, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        _fork_server_started()
        self.args = [module, *argv]
        self._dir = Path(tempfile.mkdtemp(prefix="lstm_dist_entry."))
        self._out, self._err = self._dir / "stdout", self._dir / "stderr"
        self._process = _FORK.Process(target=_entry_main, args=(module, list(argv), str(cwd), dict(env),
                                                                 str(self._out), str(self._err)))
        self._process.start()
        self.pid = self._process.pid
        self.stdout = self.stderr = None

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        """The status; raises subprocess.TimeoutExpired if it is still running after `timeout` seconds."""
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        if self.stdout is None:
            # the session's leader is gone; anything it started and left behind goes with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            self.stdout = self._out.read_text(errors="replace") if self._out.exists() else ""
            self.stderr = self._err.read_text(errors="replace") if self._err.exists() else ""
            for path in (self._out, self._err):
                path.unlink(missing_ok=True)
            self._dir.rmdir()
        return self._process.exitcode

    def kill(self) -> None:
        """SIGKILL to its whole session (and to itself, in case it has not made the session yet)."""
        for send in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                send(self.pid, signal.SIGKILL)


def run_entries(module: str, argvs: list[list[str]], envs: list[dict[str, str]], cwd: Path,
                timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """Processes of `module` (one per argv and env), all started, then waited for together: stdout and
    stderr are theirs, the first's first; the status is the first non-zero one. If any runs over
    `timeout`, every one is killed and the test fails."""
    procs = [Entry(module, argv, cwd, env) for argv, env in zip(argvs, envs)]
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
        raise AssertionError(f"{module} {' '.join(argvs[0][:6])}... ran over {timeout:.0f}s and was killed\n"
                             + "".join(f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}\n" for p in procs)) from None
    finally:
        for proc in procs:  # a process left waiting for one that failed
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    code = next((p.returncode for p in procs if p.returncode != 0), 0)
    return subprocess.CompletedProcess([module, *argvs[0]], code, "".join(p.stdout for p in procs),
                                       "".join(p.stderr for p in procs))


def rank_envs(nproc: int, env: dict | None = None) -> list[dict[str, str]]:
    """What torchrun puts in the environment of each of its `nproc` workers on one node (RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), on top of `env`."""
    port = str(free_port())
    return [{**(env or child_env()), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
             "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            for rank in range(nproc)]


def run_ranks(nproc: int, *overrides: str, cwd: Path, env: dict | None = None,
              timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """`nproc` training processes started directly, as torchrun's workers are (`rank_envs`), without
    torchrun itself, forked (`Entry`): the same code path in every rank at a fraction of the start-up.
    For tests of training, not of torchrun; those launch torchrun (`train_cmd`). stdout and stderr are
    the ranks', rank 0's first; the status is the first non-zero one. A launch that runs over `timeout`
    has every rank killed and fails the test."""
    return run_entries("lstm_dist.train", [list(overrides)] * nproc, rank_envs(nproc, env), cwd, timeout)


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
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


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


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: none without it (`-p no:xdist`, gpu_check.sh)
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one and a half workers per core (at least 2). Much of the suite's time is waiting (on a
    collective timeout, a W&B server that never answers, the Slurm scheduler) rather than computing, so
    a core runs a waiting test and part of a computing one. PYTEST_XDIST_AUTO_NUM_WORKERS overrides."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").strip().isdigit():
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(2, cores + cores // 2)


# The files that take longest, longest first. pytest-xdist runs a file on one worker (--dist loadfile, so
# that the Slurm cluster's tests stay together) and hands out files in collection order
# (--no-loadscope-reorder): a long file handed out last would leave the other core idle while it runs.
LONGEST_FIRST = ("test_faults.py", "test_slurm.py", "test_lr_sweep.py", "test_lr_find.py", "test_train.py",
                 "test_launch.py", "test_model.py", "test_bad_input.py")


def pytest_collection_modifyitems(config, items):
    """The files in LONGEST_FIRST order, then the others as collected; and `cuda` tests skip, with the
    reason, where no GPU is visible (`pytest -m cuda` runs them on one)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's order is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); run `pytest -m cuda` on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
