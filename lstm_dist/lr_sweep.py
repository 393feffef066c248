"""The learning-rate sweep behind the defaults: `python -m lstm_dist.lr_sweep run|table`.

For each cell of a grid (hidden width × layers × global batch in streams) it trains real runs
through `python -m lstm_dist.train` at rates spaced by a factor of 2 around the rate the rule in
`lstm_dist/training/lr_rule.py` gives the cell (factor 1 is the defaults' run), and extends a cell's sweep
outward until its best rate has a worse rate on both sides and it has at least `--min-rates`
rates. Every run uses the config defaults except the swept rate (and the grid's own settings), so
"defaults" in the table means exactly what a user gets. One process per run: a single process with
N streams is the same global batch, for the rule, as world × streams.

    # the table in docs/lr_sweep.md (about an hour on 2 CPU cores with --jobs 2):
    python -m lstm_dist.data prepare --source stdlib-docs --out /tmp/sweep/data
    python -m lstm_dist.lr_sweep run --data /tmp/sweep/data --out /tmp/sweep/out --jobs 2
    python -m lstm_dist.lr_sweep table --out /tmp/sweep/out
    python -m lstm_dist.lr_sweep fit --out /tmp/sweep/out       # rules ranked against the sweep

On bigger hardware widen the grid (`--widths 512,1024 --batches 64,256,1024 --bptt 128
--device cuda`). Results go to OUT/results.jsonl, one line a run; a second `run` skips runs
already there, so an interrupted sweep continues.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lstm_dist import config as config_mod
from lstm_dist.data.corpus import UNITS, Corpus
from lstm_dist.training import lr_rule
from lstm_dist.common.errors import UserError, run_cli


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{text!r} must be a comma-separated list of integers, e.g. 128,256") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{text!r} must list positive integers, e.g. 128,256")
    return values


def cell_overrides(args: argparse.Namespace, hidden: int, layers: int, batch: int) -> list[str]:
    return [f"model.hidden={hidden}", f"model.layers={layers}", f"model.embedding={args.embedding}",
            f"train.batch_size={batch}", f"train.bptt={args.bptt}", f"train.steps={args.steps}",
            f"train.device={args.device}", *args.set]


def seeds_of(args: argparse.Namespace) -> list[int]:
    """The seeds every rate is trained with: run.seed (as --set or the default) and the next ones."""
    base = config_mod.load(None, cell_overrides(args, 64, 1, 8)).run.seed
    return [base + k for k in range(args.seeds)]


def score_name(row: dict[str, Any]) -> str:
    """The name of a result row's score, its corpus's (`bpb` for bytes, `bpc` for chars: docs/scoring.md).
    Rows written before the two had names of their own say `valid_bpc` for either."""
    return next(u.score for u in UNITS.values() if f"valid_{u.score}" in row)


def valid_score(row: dict[str, Any]) -> float:
    return row[f"valid_{score_name(row)}"]


def rate_scores(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[float, float]:
    """lr -> mean valid score (bits per byte or character) over the sweep's seeds, for the rates where
    every seed was run."""
    want = set(seeds_of(args))
    by_lr: dict[float, dict[int, float]] = {}
    for r in rows:
        if r["seed"] in want:
            by_lr.setdefault(r["lr"], {})[r["seed"]] = valid_score(r)
    return {lr: statistics.fmean(v.values()) for lr, v in sorted(by_lr.items()) if set(v) == want}


def rule_lr(overrides: list[str]) -> float:
    """The rate the current defaults and rule give a cell (one process: global batch = batch_size)."""
    cfg = config_mod.load(None, overrides)
    return lr_rule.peak_lr(cfg, 1)


def run_key(overrides: list[str], lr: float) -> str:
    """What identifies a run: the settings that shape it, the current defaults included."""
    cfg = config_mod.load(None, overrides)
    t, m = cfg.train, cfg.model
    return json.dumps({"hidden": m.hidden, "layers": m.layers, "embedding": m.embedding, "dropout": m.dropout,
                       "batch": t.batch_size, "bptt": t.bptt, "steps": t.steps, "lr": float(f"{lr:.6g}"),
                       "warmup": t.warmup_steps, "schedule": t.schedule, "min_lr_ratio": t.min_lr_ratio,
                       "wd": t.weight_decay, "beta1": t.beta1, "beta2": t.beta2, "clip": t.clip_norm,
                       "seed": cfg.run.seed}, sort_keys=True)


class Results:
    """OUT/results.jsonl: one JSON object a finished run; shared by the worker threads."""

    def __init__(self, out: Path) -> None:
        self.path = out / "results.jsonl"
        self.lock = threading.Lock()
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    def get(self, key: str) -> dict[str, Any] | None:
        with self.lock:
            return self.rows.get(key)

    def add(self, row: dict[str, Any]) -> None:
        with self.lock:
            self.rows[row["key"]] = row
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


_FORKSERVER: Any = None
_FORKSERVER_LOCK = threading.Lock()


def _training_child(argv: list[str], log: str, env: dict[str, str]) -> None:
    """In a child of the fork server: `python -m lstm_dist.train ARGV` with stdout and stderr in `log` and
    the environment `env`, exiting with its status."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from lstm_dist.train import main

    run_cli(main, argv)  # raises SystemExit with the run's status


def run_training(argv: list[str], log: Path, env: dict[str, str]) -> int:
    """One training run, as `python -m lstm_dist.train ARGV` would make it, its output in `log`: its exit
    status. Each run is forked from one fork server that imported torch and the trainer once (multiprocessing's
    `forkserver`, single-threaded, so forking it is safe), not started afresh: a new interpreter spends ~5 s on
    2 cores importing torch and dynamo (which torch's optimizers import on first use) before training."""
    global _FORKSERVER
    import multiprocessing

    with _FORKSERVER_LOCK:
        if _FORKSERVER is None:
            _FORKSERVER = multiprocessing.get_context("forkserver")
            _FORKSERVER.set_forkserver_preload(["torch", "torch._dynamo", "lstm_dist.train"])
        proc = _FORKSERVER.Process(target=_training_child, args=(argv, str(log), env), name=log.stem)
        proc.start()
    proc.join()
    return proc.exitcode if proc.exitcode is not None and proc.exitcode >= 0 else 128 - (proc.exitcode or 0)


def train_once(args: argparse.Namespace, results: Results, overrides: list[str], lr: float, name: str) -> float:
    """One real training run at peak rate `lr` (the rule switched off); its final valid score."""
    key = run_key(overrides, lr)
    done = results.get(key)
    if done is not None:
        return valid_score(done)
    run_dir = Path(args.out) / "runs"
    argv = [f"data.path={args.data}", f"run.dir={run_dir}",
            f"run.name={name}", *overrides, f"train.lr={lr:.6g}", "train.lr_scaling=none",
            f"train.threads={args.threads}", "train.eval_every=0", "train.sample_chars=0", "checkpoint.every=0",
            "checkpoint.resume=never", "checkpoint.keep=1", "log.every=50", "log.wandb.mode=disabled"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), WANDB_SILENT="true")
    log = Path(args.out) / "logs" / f"{name}.log"
    t0 = time.perf_counter()
    returncode = run_training(argv, log, env)
    wall = time.perf_counter() - t0
    u = Corpus(args.data).vocab.units
    score = math.inf  # a diverged run (non-finite stop) counts as infinitely bad
    summary = Path(run_dir) / name / "metrics.jsonl"
    if returncode == 0:
        for line in summary.read_text().splitlines():
            row = json.loads(line)
            if f"val/{u.score}" in row and f"test/{u.score}" in row:  # the final evaluation's row (docs/metrics.md)
                score = row[f"val/{u.score}"]
    elif returncode != 3:
        raise RuntimeError(f"run {name} failed with exit status {returncode}; see {log}")
    results.add({"key": key, "name": name, "lr": float(f"{lr:.6g}"), f"valid_{u.score}": score,
                 "wall_s": round(wall, 1), **json.loads(key)})
    print(f"[{time.strftime('%H:%M:%S')}] {name}: lr {lr:.4g} -> valid {score:.4f} {u.score} ({wall:.0f}s)", flush=True)
    return score


def sweep_cell(args: argparse.Namespace, results: Results, hidden: int, layers: int, batch: int) -> None:
    overrides = cell_overrides(args, hidden, layers, batch)
    center = rule_lr(overrides)
    cell = f"h{hidden}_l{layers}_b{batch}"
    scores: dict[int, float] = {}  # exponent k -> valid score at center × 2^k

    def at(k: int) -> float:
        if k not in scores:
            lr = center * 2.0 ** k
            scores[k] = statistics.fmean(
                train_once(args, results, [*overrides, f"run.seed={seed}"], lr, f"{cell}_lr{lr:.3g}_s{seed}")
                for seed in seeds_of(args))
        return scores[k]

    # The rule's rate and half of it first; then outward on the side that is better, so that a cell
    # whose best rate is far below the rule's does not spend a run on the (diverging) double.
    at(0)
    at(-1)
    while True:
        best = min(scores, key=scores.get)
        lo, hi = min(scores), max(scores)
        if best == lo and lo > -args.max_doublings:
            at(lo - 1)
        elif best == hi and hi < args.max_doublings:
            at(hi + 1)
        elif len(scores) < args.min_rates:
            # one more on the side of the better neighbour: the curve is flatter there
            left, right = scores.get(best - 1, math.inf), scores.get(best + 1, math.inf)
            at(lo - 1 if left <= right else hi + 1)
        else:
            return


def cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not (Path(args.data) / "meta.json").exists():
        raise UserError(f"--data {args.data} is not a prepared corpus; prepare one first "
                        "(python -m lstm_dist.data prepare --source stdlib-docs --out DIR)")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results = Results(out)
    cells = list(itertools.product(_ints(args.widths), _ints(args.layers), _ints(args.batches)))
    # most expensive first, so that the last cells to finish are short ones
    cells.sort(key=lambda c: -(c[0] ** 2 * c[1] * c[2]))
    with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(sweep_cell, args, results, *c) for c in cells]
        for f in cf.as_completed(futures):
            f.result()
    return cmd_table(args)


def cmd_table(args: argparse.Namespace) -> int:
    results = Results(Path(args.out))
    by_cell: dict[tuple, list[dict[str, Any]]] = {}
    for row in results.rows.values():
        by_cell.setdefault((row["hidden"], row["layers"], row["batch"]), []).append(row)
    unit = score_name(next(iter(results.rows.values()))) if results.rows else "bpb"
    lines = [f"| width × layers | global batch (streams) | rates swept: valid {unit} | best rate | best {unit} "
             f"| defaults' rate | defaults' {unit} | defaults − best |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    worst = 0.0
    for (hidden, layers, batch), rows in sorted(by_cell.items()):
        overrides = cell_overrides(args, hidden, layers, batch)
        want = json.loads(run_key(overrides, rule_lr(overrides)))
        scores = rate_scores(args, [r for r in rows if all(r[k] == v for k, v in want.items() if k not in ("lr", "seed"))])
        if not scores:
            continue
        best = min(scores, key=scores.get)
        default = next((lr for lr in scores if math.isclose(lr, want["lr"], rel_tol=1e-4)), None)
        swept = ", ".join(f"{lr:.3g}: {bpc:.3f}" for lr, bpc in scores.items())
        if default is None:
            d_rate, d_bpc, gap = f"{want['lr']:.3g}", "not run", "—"
        else:
            d_rate, d_bpc = f"{default:.3g}", f"{scores[default]:.3f}"
            gap_value = scores[default] - scores[best]
            worst = max(worst, gap_value)
            gap = f"{gap_value:+.3f}"
        lines.append(f"| {hidden} × {layers} | {batch} | {swept} | {best:.3g} | {scores[best]:.3f} "
                     f"| {d_rate} | {d_bpc} | {gap} |")
    print(f"valid {unit}: the mean over {args.seeds} seed{'s' if args.seeds > 1 else ''} ({', '.join(map(str, seeds_of(args)))}) at every rate\n")
    print("\n".join(lines))
    print(f"\nlargest gap between the defaults and the best swept rate: {worst:.3f} {unit}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    """Rank rules by how close they put every cell to its best swept rate. Only rules whose rate
    for every cell was actually run are ranked (no interpolation): exponents that move the rate
    by powers of 2 across the grid, and reference rates on the sweep's grid of rates."""
    results = Results(Path(args.out))
    by_cell: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for row in results.rows.values():
        by_cell.setdefault((row["hidden"], row["layers"], row["batch"]), []).append(row)
    cells = {c: scores for c, rows in by_cell.items() if (scores := rate_scores(args, rows))}
    if not cells:
        raise UserError(f"no results in {args.out}; run `python -m lstm_dist.lr_sweep run` first")
    best = {c: min(v.values()) for c, v in cells.items()}
    ranked = []
    rates = sorted({lr for v in cells.values() for lr in v})
    for a, b, d in itertools.product((0.0, 0.5, 1.0), (0.0, 0.5, 1.0, 2.0), (0.0, 1.0, 2.0)):
        for lr in rates:
            gaps = {}
            for (hidden, layers, batch), runs in cells.items():
                want = lr * (batch / args.ref_batch) ** a * (args.ref_hidden / hidden) ** b / layers ** d
                hit = [r for r in runs if math.isclose(r, want, rel_tol=1e-3)]
                if not hit:
                    break
                gaps[(hidden, layers, batch)] = runs[hit[0]] - best[(hidden, layers, batch)]
            else:
                # lr is the rate at (ref_batch, ref_hidden, 1 layer) only if that shape is in the grid;
                # otherwise it is the reference rate the rule implies
                ranked.append((sum(g > args.tolerance for g in gaps.values()), max(gaps.values()),
                               sum(gaps.values()), a, b, d, lr))
    ranked.sort()
    unit = score_name(next(iter(results.rows.values())))
    print(f"| cells more than {args.tolerance} {unit} from their best | worst gap | sum of gaps | batch exp. "
          "| width exp. | depth exp. | train.lr |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for misses, worst, total, a, b, d, lr in ranked[:args.top]:
        print(f"| {misses} of {len(cells)} | {worst:.3f} | {total:.3f} | {a:g} | {b:g} | {d:g} | {lr:.3g} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstm_dist.lr_sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "table", "fit"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True, help="directory for results.jsonl, logs/ and runs/")
        p.add_argument("--widths", default="128,256", help="model.hidden values")
        p.add_argument("--layers", default="1,2", help="model.layers values")
        p.add_argument("--batches", default="8,32,128", help="global batches in streams (one process each)")
        p.add_argument("--embedding", type=int, default=64)
        p.add_argument("--bptt", type=int, default=32)
        p.add_argument("--steps", type=int, default=500)
        p.add_argument("--device", default="cpu", choices=config_mod.choices("train.device"))
        p.add_argument("--set", action="append", default=[], metavar="section.key=value",
                       help="another setting for every run (repeatable)")
        p.add_argument("--seeds", type=int, default=2,
                       help="runs per rate, seeds run.seed, run.seed+1, ...; a rate scores their mean valid score")
        if name == "run":
            p.add_argument("--data", required=True, help="prepared corpus directory")
            p.add_argument("--jobs", type=int, default=2, help="runs at the same time")
            p.add_argument("--threads", type=int, default=1, help="torch threads per run")
            p.add_argument("--min-rates", type=int, default=4, help="rates per cell at least")
            p.add_argument("--max-doublings", type=int, default=4, help="never go further than 2^N from the rule")
        if name == "fit":
            p.add_argument("--ref-batch", type=int, default=config_mod.TrainConfig.lr_ref_batch,
                           help="lr_ref_batch of the rules ranked (default: the config's)")
            p.add_argument("--ref-hidden", type=int, default=config_mod.TrainConfig.lr_ref_hidden,
                           help="lr_ref_hidden of the rules ranked (default: the config's)")
            p.add_argument("--tolerance", type=float, default=0.03, help="bits (per byte or character) a cell may be from its best")
            p.add_argument("--top", type=int, default=10, help="rules to print")
    args = parser.parse_args(argv)
    return {"run": cmd_run, "table": cmd_table, "fit": cmd_fit}[args.command](args)


if __name__ == "__main__":
    run_cli(main)
