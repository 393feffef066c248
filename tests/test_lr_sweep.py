"""The sweep behind the learning-rate defaults (`python -m lstm_dist.lr_sweep`), through its real entry
point on a tiny model: whole training runs at rates a factor of 2 apart around the rule's, every rate
with each seed, a table of seed means, a ranking of rules, and a rerun that trains nothing new.

The sweep runs once as the real command (it starts each training run as a process of its own); the
table, the ranking and the rerun read its results through the same main() in this process."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env
from lstm_dist.common.errors import run_cli
from lstm_dist.lr_sweep import main

CELL = ["--widths", "16", "--layers", "1", "--batches", "4", "--embedding", "8", "--bptt", "16", "--steps", "12"]


def sweep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real `python -m lstm_dist.lr_sweep ARGS`."""
    return subprocess.run([sys.executable, "-m", "lstm_dist.lr_sweep", *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=600)


def sweep_here(capsys, *args: str) -> str:
    """`python -m lstm_dist.lr_sweep ARGS` in this process: its stdout, after checking exit status 0."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, list(args))
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err
    return out


@pytest.mark.slow
def test_sweep_runs_every_rate_with_each_seed_and_tables_their_mean(tmp_path, tiny_corpus, capsys):
    from lstm_dist import config as C
    from lstm_dist.training import lr_rule

    out = tmp_path / "sweep"
    # at most one doubling either way and at least 3 rates: the rule's rate, its half and its double
    proc = sweep("run", "--out", str(out), "--data", str(tiny_corpus), *CELL, "--seeds", "2", "--min-rates", "3",
                 "--max-doublings", "1", "--jobs", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    center = lr_rule.peak_lr(C.load(None, ["model.hidden=16", "model.layers=1", "model.embedding=8",
                                           "train.batch_size=4"]), 1)
    by_lr: dict[float, dict[int, float]] = {}
    for r in rows:
        by_lr.setdefault(r["lr"], {})[r["seed"]] = r["valid_bpb"]  # the tiny corpus: bytes
    assert len(by_lr) == 3 and len(rows) == 6, by_lr
    for lr, seeds in by_lr.items():
        k = math.log2(lr / center)
        assert abs(k - round(k)) < 1e-3 and abs(k) <= 1, f"{lr} is not the rule's rate times 2^-1, 2^0 or 2^1"
        assert set(seeds) == {1234, 1235} and all(math.isfinite(v) for v in seeds.values())
    default = next(lr for lr in by_lr if math.isclose(lr, center, rel_tol=1e-4))  # the defaults' rate was run
    # two seeds are two different runs
    assert any(s[1234] != s[1235] for s in by_lr.values())

    # the table: each rate's mean over both seeds; the defaults' rate and its gap to the best
    table = sweep_here(capsys, "table", "--out", str(out), *CELL, "--seeds", "2")
    assert "the mean over 2 seeds (1234, 1235)" in table and table in proc.stdout  # `run` ends with the table
    row = next(line for line in table.splitlines() if line.startswith("| 16 × 1 | 4 |"))
    means = {lr: statistics.fmean(s.values()) for lr, s in by_lr.items()}
    for lr, bpc in means.items():
        assert f"{lr:.3g}: {bpc:.3f}" in row
    best = min(means, key=means.get)
    gap = means[default] - means[best]
    assert row.endswith(f"| {gap:+.3f} |"), row
    # one seed: the table reads only seed 1234's runs
    one = sweep_here(capsys, "table", "--out", str(out), *CELL, "--seeds", "1")
    assert f"{min(by_lr):.3g}: {by_lr[min(by_lr)][1234]:.3f}" in one

    # fit ranks rules against the same means
    fit = sweep_here(capsys, "fit", "--out", str(out), *CELL, "--seeds", "2", "--top", "3")
    assert "| 0 of 1 |" in fit  # some rule puts the one cell at its best rate

    # a second run finds every run done and trains nothing
    sweep_here(capsys, "run", "--out", str(out), "--data", str(tiny_corpus), *CELL, "--seeds", "2", "--min-rates", "3",
               "--max-doublings", "1", "--jobs", "1")
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)
    assert len(list((out / "runs").iterdir())) == len(rows)  # no run directory of a new run
