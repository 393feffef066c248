"""The LR range test through its real entry point: bad input, what it prints and writes (its curve as
an offline W&B run, read back with wandb's own reader), and that its suggestion lands near the best
rate of a small real sweep."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import child_env, read_metrics, run_train
from lstm_dist.common.errors import run_cli
from lstm_dist.lr_find import main
from test_metrics import CLOSED_URL, history, inspect_run, run_record, summary_of

SMALL = ["model.embedding=16", "model.hidden=64", "model.layers=1", "model.compile=false", "train.batch_size=16",
         "train.bptt=32", "train.device=cpu", "train.threads=1"]


def lr_find(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lstm_dist.lr_find", *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=300)


def suggested(stdout: str) -> float:
    m = re.search(r"suggested peak rate ([0-9.e+-]+)", stdout)
    assert m, stdout
    return float(m.group(1))


@pytest.mark.parametrize("args, message", [
    (["--start", "0"], "--start must be a positive rate, got 0; try --start 1e-5"),
    (["--start", "1e-3", "--end", "1e-4"], "--end must be above --start (0.001), got 0.0001; try --end 1"),
    (["--steps", "5"], "--steps must be at least 20 to draw a curve, got 5; try --steps 100"),
    (["--smooth", "1"], "--smooth must be in [0, 1), got 1; try --smooth 0.9"),
    (["--divisor", "0.5"], "--divisor must be at least 1, got 0.5; try --divisor 1.2"),
    (["--world", "0"], "--world must be at least 1"),
    (["train.nope=1"], "unknown key 'train.nope'"),
])
def test_bad_arguments_end_in_one_line_and_exit_2(tmp_path, args, message, capsys, monkeypatch):
    # The first case through the real command line; the others through its main() in this process (a
    # process each would only import torch again).
    if args == ["--start", "0"]:
        proc = lr_find(*args, cwd=tmp_path)
    else:
        monkeypatch.chdir(tmp_path)
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            run_cli(main, list(args))
        out, err = capsys.readouterr()
        proc = subprocess.CompletedProcess(args, done.value.code, out, err)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


@pytest.mark.slow
def test_range_test_runs_prints_a_table_and_writes_nothing_into_the_run_directory(tmp_path, tiny_corpus, capsys,
                                                                                 monkeypatch):
    run_dir = tmp_path / "runs"
    csv = tmp_path / "lr.csv"
    monkeypatch.chdir(tmp_path)  # by its main() in this process: the command line itself is the first bad-argument case's
    out = lr_find_here(capsys, *SMALL, "train.batch_size=4", "train.bptt=16", f"data.path={tiny_corpus}",
                       f"run.dir={run_dir}", "run.name=real", "log.wandb.mode=disabled", "--steps", "40", "--start",
                       "1e-4", "--end", "1", "--world", "2", "--csv", str(csv))
    assert "8 streams × bptt 16 (world 2 × batch_size 4)" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+[0-9.e-]+\s+[0-9.]+\s+[0-9.]+", line)]
    assert len(rows) >= 10
    rates = [float(r[0]) for r in rows]
    assert rates == sorted(rates) and rates[0] == pytest.approx(1e-4)
    s = suggested(out)
    assert math.isfinite(s) and 1e-4 <= s <= 1.0
    assert "train.lr=" in out and "peak lr" in out
    assert not run_dir.exists(), "the range test must not write into a run directory (nor W&B files when disabled)"
    lines = csv.read_text().splitlines()
    assert lines[0] == "step,lr,loss,smoothed" and 2 <= len(lines) - 1 <= 40


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb's own files under tmp_path, no credentials, a server that refuses connections (as in
    tests/test_metrics.py, without moving HOME: torch's extension cache stays where it was built)."""
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        (tmp_path / name.lower()).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-such-netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", CLOSED_URL)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    yield
    if "wandb" in sys.modules and sys.modules["wandb"] is not None:
        sys.modules["wandb"].teardown()


def lr_find_here(capsys, *args: str) -> str:
    """`python -m lstm_dist.lr_find ARGS` by its main() in this process: its stdout (exit status 0)."""
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        assert main(list(args)) == 0
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def test_the_curve_goes_to_an_offline_wandb_run_with_the_rate_as_x(tmp_path, tiny_corpus, capsys, offline_wandb):
    """Issue 21 part 4: the range test's steps as a W&B run of its own under run.dir/lr_find/run.name
    (not the run's directory), offline without a key: every step's rate, loss and smoothed loss, plotted
    against the rate (define_metric), the suggestion in the summary; the last line says where it is
    and how to see it. A second test is a second W&B run beside the first."""
    runs = tmp_path / "runs"
    args = [*SMALL, "model.hidden=16", "train.batch_size=4", "train.bptt=16", f"data.path={tiny_corpus}",
            f"run.dir={runs}", "run.name=real", "log.wandb.mode=auto", "--steps", "20", "--csv", str(tmp_path / "lr.csv")]
    out = lr_find_here(capsys, *args)
    folders = sorted((runs / "lr_find" / "real" / "wandb").glob("offline-run-*"))
    assert len(folders) == 1 and sorted(p.name for p in runs.iterdir()) == ["lr_find"]  # no run directory
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"W&B: the curve (x = learning rate) is the offline run {folders[0]}; ") and \
        f"`wandb leet {folders[0]}`" in last and f"`wandb sync {folders[0]}`" in last, out
    assert f"{'bpb':>6}" in out.splitlines()[1]  # the table's bits are per byte: a bytes corpus
    records = inspect_run(folders[0])
    rows = history(records)
    csv = [line.split(",") for line in (tmp_path / "lr.csv").read_text().splitlines()[1:]]
    assert sorted(rows) == [int(step) for step, *_ in csv] == list(range(1, 21))
    for step, lr, loss, smoothed in csv:
        row = rows[int(step)]
        assert row["lr_find/lr"] == pytest.approx(float(lr), rel=1e-5)
        assert row["lr_find/loss"] == pytest.approx(float(loss), abs=1e-6)
        assert row["lr_find/smoothed_bpb"] == pytest.approx(float(smoothed) / math.log(2), abs=1e-5)
    axes = {r["metric"]["name"]: r["metric"].get("step_metric") for r in records if r["type"] == "metric"}
    assert axes == {"lr_find/loss": "lr_find/lr", "lr_find/smoothed_loss": "lr_find/lr",
                    "lr_find/smoothed_bpb": "lr_find/lr"}
    summary = summary_of(records)
    assert summary["lr_find/suggested_lr"] == pytest.approx(suggested(out), rel=1e-2)
    assert summary["lr_find/stopped_early"] in (True, False)
    assert run_record(records)["config"]  # the settings travel with the curve
    lr_find_here(capsys, *args)
    again = sorted((runs / "lr_find" / "real" / "wandb").glob("offline-run-*"))
    assert len(again) == 2 and len({p.name.rsplit("-", 1)[1] for p in again}) == 2  # two runs, two ids


def test_without_wandb_the_range_test_goes_on_and_says_so_once(tmp_path, tiny_corpus, capsys, offline_wandb,
                                                                monkeypatch):
    """wandb missing (an import that fails, as on the GPU machines): one warning line, no W&B files, the
    table and the suggestion as ever; `disabled` does not try."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    runs = tmp_path / "runs"
    args = [*SMALL, "model.hidden=16", "train.batch_size=4", "train.bptt=16", f"data.path={tiny_corpus}",
            f"run.dir={runs}", "run.name=real"]
    out = lr_find_here(capsys, *args, "log.wandb.mode=offline", "--steps", "20")
    warnings = [line for line in out.splitlines() if "W&B" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: W&B offline needs the wandb package"), out
    assert "suggested peak rate" in out and not list(runs.rglob("offline-run-*"))
    out = lr_find_here(capsys, *args, "log.wandb.mode=disabled", "--steps", "20")
    assert "W&B" not in out and not list(runs.rglob("offline-run-*"))


@pytest.mark.slow
def test_suggestion_lands_near_the_best_rate_of_a_small_real_sweep(tmp_path, capsys, monkeypatch):
    from lstm_dist.data.prepare import prepare

    # real prose-like text (the built-in corpus of standard-library docstrings), where the rate matters:
    # generated word salad is learnt at almost any rate
    corpus = prepare("stdlib-docs", tmp_path / "stdlib-docs", quiet=True)
    common = [*SMALL, f"data.path={corpus}", "train.eval_every=0", "train.sample_chars=0", "log.every=50",
              "log.wandb.mode=disabled", "checkpoint.every=0", f"run.dir={tmp_path / 'runs'}"]
    # the real thing: whole runs at rates about a factor of 3 apart, each with the defaults' schedule
    rates = [0.01, 0.03, 0.1, 0.3]
    bpc = {}
    for lr in rates:
        run_train(1, *common, f"run.name=lr{lr}", f"train.lr={lr}", "train.lr_scaling=none", "train.steps=200",
                  cwd=tmp_path)
        bpc[lr] = [m for m in read_metrics(tmp_path / "runs" / f"lr{lr}") if "test/bpb" in m][-1]["val/bpb"]
    best = min(bpc, key=bpc.get)
    assert best not in (rates[0], rates[-1]), f"the sweep must bracket its best rate: {bpc}"
    monkeypatch.chdir(tmp_path)
    s = suggested(lr_find_here(capsys, *common, "--steps", "100"))
    # "near": within one step of the sweep's grid (a factor of 3) of its best rate
    assert best / 3.01 <= s <= best * 3.01, f"suggested {s:.3g}, sweep {bpc}"
