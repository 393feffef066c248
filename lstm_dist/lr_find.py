"""LR range test: `python -m lstm_dist.lr_find --config FILE [section.key=value ...]`.

A short run on your corpus and model, before a long one (the test fastai and Lightning's `lr_find`
made familiar): the learning rate rises exponentially from `--start` to `--end` over `--steps`
optimizer steps, through the trainer's own step with the run's kernels and precision (bf16 autocast
on CUDA, as training runs), optimizer, betas, weight decay, clipping and global batch, and the loss
is smoothed with a bias-corrected moving average. It stops early once the smoothed loss climbs past
`--stop-factor` times its lowest value. It prints a table of rate → smoothed loss and a suggested
peak rate, and the `train.lr` that gives that rate under the learning-rate rule
(`lstm_dist/training/lr_rule.py`) for the world size you will train with.

It writes nothing into a run directory: no checkpoint, no metrics. The curve goes to W&B as a run of
its own (x = the learning rate; `log.wandb.mode` as in training: offline where no API key is
configured, `disabled` for none), under `run.dir/lr_find/run.name/wandb/` (a new W&B run each time),
and the last lines say where and how to see it: `wandb leet FOLDER` in a terminal, or `wandb sync
FOLDER` and the W&B UI (set the panel's x axis to log scale). `--csv FILE` writes every step too.

The suggestion is the rate where the smoothed loss is lowest, divided by `--divisor` (default 1.2).
Measured on the 18 cells of docs/lr_sweep.md (100 steps against the best rate of real 500-step
runs, two seeds each, the defaults' AdamW without momentum): the lowest point sat 1.5-4.2x above
the best rate for one layer and 0.32-0.62x of it (below it) for two, because a stack's loss stalls
for a while as the rate rises during the test. 1.2 is the divisor that keeps the worst cell closest
(within 3.8x either way): the suggestion tends to be high for one layer and low for a stack, so
read it as the middle of a small sweep (half, once and twice it), not as the answer. It raises the
rate slowly (a warm-up of its own), so it cannot see a model that fails when it starts at full rate.

    python -m lstm_dist.lr_find --config configs/smoke.yaml --world 2
    python -m lstm_dist.lr_find model.hidden=256 train.batch_size=32 --steps 200 --csv /tmp/lr.csv
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lstm_dist import config as config_mod
from lstm_dist.common.distributed import DistEnv, cpu_threads, pick_device
from lstm_dist.common.errors import UserError, run_cli
from lstm_dist.data.corpus import Units
from lstm_dist.data.run_corpus import open_corpus
from lstm_dist.data.streams import TokenStream
from lstm_dist.inference.scoring import LN2
from lstm_dist.model.char_lstm import CharLSTM
from lstm_dist.model.kernels import choose_kernels
from lstm_dist.training import lr_rule
from lstm_dist.training.optim import build_optimizer
from lstm_dist.training.seeds import seed_everything
from lstm_dist.training.batching import global_batch
from lstm_dist.training.step import TrainingStep
from lstm_dist.training.wandb_sink import WandbSink


@dataclass
class RangeTest:
    rates: list[float]
    losses: list[float]  # raw loss (nats per character) of each step
    smoothed: list[float]  # bias-corrected moving average of `losses`
    suggested: float
    lowest: float  # the rate where `smoothed` was lowest
    stopped_early: bool
    units: Units  # the corpus vocabulary's names: the loss in bits per byte (bpb) or per character (bpc)


def smooth(losses: list[float], beta: float) -> list[float]:
    out, avg = [], 0.0
    for i, loss in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** i))
    return out


def suggest(rates: list[float], smoothed: list[float], divisor: float, skip: int) -> tuple[float, float]:
    """(suggested rate, rate at the lowest smoothed loss); the first `skip` steps are ignored."""
    start = min(skip, max(0, len(smoothed) - 1))
    i = min(range(start, len(smoothed)), key=lambda j: smoothed[j])
    return rates[i] / divisor, rates[i]


def range_test(cfg: config_mod.Config, world: int, start: float, end: float, steps: int, beta: float,
               stop_factor: float, divisor: float, device: torch.device, say=print) -> RangeTest:
    """Train `steps` steps of `cfg`'s model in this process on the real run's global batch of streams
    (`train.global_batch_size`, or world × batch_size), in forward passes of `train.batch_size` streams
    with the gradients accumulated, the rate rising exponentially from `start` to `end`: the run's own
    kernels, autocast and training step (`training.step.TrainingStep`), so on CUDA it measures what
    training runs. Raises UserError when fewer than two steps gave a finite loss."""
    t = cfg.train
    streams = global_batch(t, world)  # the real run's global batch, in one process
    # one process, no process group: rank 0 of a world of 1 (a missing built-in corpus is prepared)
    corpus = open_corpus(cfg, DistEnv(rank=0, world=1, local_rank=0, local_world=1, device=device), say)
    stream = TokenStream(corpus.split("train"), 0, 1, streams, t.bptt, seed=cfg.run.seed,
                         random_offset=cfg.data.random_offset)
    seed_everything(cfg.run.seed)
    kernels = choose_kernels(cfg.model, t.precision, device, batch=t.batch_size, say=say, tf32=t.tf32, bptt=t.bptt,
                             vocab=corpus.vocab.size)
    model = CharLSTM.from_config(cfg.model, corpus.vocab.size, kernels=kernels).to(device)
    step = TrainingStep(model, model, build_optimizer(model, t), t.clip_norm, kernels.autocast,
                        micro_batches=streams // t.batch_size)
    state = None
    rates, losses = [], []
    stopped = False
    best = math.inf
    for k in range(steps):
        lr = start * (end / start) ** (k / max(1, steps - 1))
        batch = stream.next()
        x, y = batch.x.to(device), batch.y.to(device)
        if batch.reset or state is None:
            state = model.init_state(x.shape[0], device=device)
        value = float(step.forward_backward(x, y, state).detach())
        if not math.isfinite(value):
            stopped = True
            break
        step.clip()
        state = step.apply(lr)
        rates.append(lr)
        losses.append(value)
        current = smooth(losses, beta)[-1]
        best = min(best, current)
        if k >= steps // 10 and current > stop_factor * best:
            stopped = True
            break
    if len(losses) < 2:
        raise UserError(f"the loss was not finite from the first step at lr {start:g}; lower --start "
                        "(or check the model settings)")
    smoothed = smooth(losses, beta)
    suggested, lowest = suggest(rates, smoothed, divisor, skip=steps // 10)
    return RangeTest(rates, losses, smoothed, suggested, lowest, stopped, corpus.vocab.units)


def wandb_dir(cfg: config_mod.Config) -> Path:
    """Where the range test's W&B runs go: `run.dir/lr_find/run.name` (beside the run directories, not
    in the run's own, so a training run of that name starts fresh)."""
    return Path(cfg.run.dir) / "lr_find" / cfg.run.name


def log_curve(cfg: config_mod.Config, result: RangeTest, settings: dict, say=print) -> Path | None:
    """The range test as a W&B run of its own, under `wandb_dir(cfg)`, in `log.wandb.mode` (chosen as
    training chooses it: `training.wandb_sink.WandbSink`; a fresh run id every time): one history row
    per step (step = the optimizer step, 1-based) with `lr_find/lr`, `lr_find/loss` (nats per token),
    `lr_find/smoothed_loss` and the smoothed loss in bits (`lr_find/smoothed_bpb` or `.../smoothed_bpc`,
    after the vocabulary), each plotted against `lr_find/lr` (`define_metric`); the summary holds
    `lr_find/suggested_lr`, `lr_find/lowest_lr` and `lr_find/stopped_early`; `settings` (the command's
    options) join the config. The names are not training's (`train/loss`, `train/lr`: docs/metrics.md):
    this curve's x is the rate, not the step, and in a project that holds both, W&B's panels of one name
    gather every run's curve of that name. Returns the W&B run's folder, or None where W&B is off
    (disabled, wandb missing, or failed: one line says so)."""
    w = cfg.log.wandb
    sink = WandbSink(wandb_dir(cfg), w.mode, {**cfg.to_dict(), "lr_find": settings}, w.project, w.entity or None,
                     f"lr_find-{cfg.run.name}", w.init_timeout, 60.0, say, keep_id=False)
    if sink.run is None:
        return None
    folder = Path(sink.run.dir).parent  # wandb/offline-run-<time>-<id> (or run-... online)
    bits = f"lr_find/smoothed_{result.units.score}"

    def curve(run) -> None:
        for key in ("lr_find/loss", "lr_find/smoothed_loss", bits):
            run.define_metric(key, step_metric="lr_find/lr")
        for i, (lr, loss, smoothed) in enumerate(zip(result.rates, result.losses, result.smoothed), 1):
            run.log({"lr_find/lr": lr, "lr_find/loss": loss, "lr_find/smoothed_loss": smoothed, bits: smoothed / LN2},
                    step=i)
        run.summary.update({"lr_find/suggested_lr": result.suggested, "lr_find/lowest_lr": result.lowest,
                            "lr_find/stopped_early": result.stopped_early})

    sink.call(curve)
    online = sink.mode == "online" and sink.run is not None
    url = getattr(sink.run, "url", None) if online else None
    sink.close()
    if sink.mode == "disabled":  # failed while logging: the sink said so
        return None
    if online:
        say(f"W&B: the curve (x = learning rate) is run {url or folder.name}")
    else:
        say(f"W&B: the curve (x = learning rate) is the offline run {folder}; see it in a terminal with "
            f"`wandb leet {folder}`, or upload it with `wandb sync {folder}` and open it in the W&B UI")
    return folder


def _check(args: argparse.Namespace) -> None:
    if not (args.start > 0 and math.isfinite(args.start)):
        raise UserError(f"--start must be a positive rate, got {args.start:g}; try --start 1e-5")
    if not (args.end > args.start and math.isfinite(args.end)):
        raise UserError(f"--end must be above --start ({args.start:g}), got {args.end:g}; try --end 1")
    if args.steps < 20:
        raise UserError(f"--steps must be at least 20 to draw a curve, got {args.steps}; try --steps 100")
    if not 0.0 <= args.smooth < 1.0:
        raise UserError(f"--smooth must be in [0, 1), got {args.smooth:g}; try --smooth 0.9")
    if args.stop_factor <= 1.0:
        raise UserError(f"--stop-factor must be above 1, got {args.stop_factor:g}; try --stop-factor 4")
    if args.divisor < 1.0:
        raise UserError(f"--divisor must be at least 1, got {args.divisor:g}; try --divisor 1.2")
    if args.world < 1:
        raise UserError(f"--world must be at least 1 (the processes of the real run), got {args.world}")
    if args.rows < 2:
        raise UserError(f"--rows must be at least 2, got {args.rows}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstm_dist.lr_find", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config", metavar="FILE", help="YAML file with settings (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="settings that win over the file")
    parser.add_argument("--world", type=int, default=1,
                        help="processes the real run will use: the test runs one process with the run's global batch "
                             "(train.global_batch_size, or world × batch_size streams; default 1)")
    parser.add_argument("--start", type=float, default=1e-4, help="first learning rate (default 1e-4)")
    parser.add_argument("--end", type=float, default=1.0, help="last learning rate (default 1)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the sweep (default 100)")
    parser.add_argument("--smooth", type=float, default=0.9, help="moving-average factor of the loss (default 0.9)")
    parser.add_argument("--stop-factor", type=float, default=4.0,
                        help="stop once the smoothed loss exceeds this × its lowest (default 4)")
    parser.add_argument("--divisor", type=float, default=1.2,
                        help="suggested rate = rate at the lowest smoothed loss / this (default 1.2)")
    parser.add_argument("--rows", type=int, default=20, help="rows of the printed table (default 20)")
    parser.add_argument("--csv", metavar="FILE", help="also write every step (rate, loss, smoothed) to FILE")
    args = parser.parse_args(argv)
    _check(args)
    cfg = config_mod.load(args.config, args.overrides)
    t = cfg.train
    device = pick_device(t.device)  # the trainer's choice for local rank 0
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(t.threads, 1))  # one process: all of this machine's share
    streams = global_batch(t, args.world)
    where = (f"train.global_batch_size, in passes of {t.batch_size}" if t.global_batch_size else
             f"world {args.world} × batch_size {t.batch_size}")
    print(f"LR range test: {args.steps} steps, rate {args.start:g} → {args.end:g} (exponential), "
          f"{streams} streams × bptt {t.bptt} ({where}), "
          f"{cfg.model.layers} × {cfg.model.hidden} LSTM, {device.type}; nothing is written to {cfg.run_dir}",
          flush=True)
    t0 = time.perf_counter()
    result = range_test(cfg, args.world, args.start, args.end, args.steps, args.smooth, args.stop_factor,
                        args.divisor, device)
    n = len(result.rates)
    picks = sorted({round(i * (n - 1) / (args.rows - 1)) for i in range(args.rows)})
    print(f"{'rate':>10}  {'smoothed loss':>13}  {result.units.score:>6}")
    for i in picks:
        mark = "  ← lowest" if result.rates[i] == result.lowest else ""
        print(f"{result.rates[i]:>10.3g}  {result.smoothed[i]:>13.4f}  {result.smoothed[i] / LN2:>6.3f}{mark}")
    if result.stopped_early:
        print(f"stopped at rate {result.rates[-1]:.3g}: the smoothed loss left {args.stop_factor:g}× its lowest")
    scale = lr_rule.scale_factor(cfg, args.world)
    print(f"lowest smoothed loss at rate {result.lowest:.3g}; suggested peak rate {result.suggested:.3g} "
          f"(lowest / {args.divisor:g}) in {time.perf_counter() - t0:.0f}s")
    if t.lr_scaling == "none":
        print(f"to use it: train.lr={result.suggested:.3g} (train.lr_scaling=none); the config now gives "
              f"{lr_rule.peak_lr(cfg, args.world):.3g}")
    else:
        print(f"to use it: train.lr={result.suggested / scale:.3g} (the rule multiplies train.lr by {scale:.3g} "
              f"for {streams} streams); the config now gives {lr_rule.explain(cfg, args.world)}")
    if args.csv:
        with open(args.csv, "w", encoding="utf-8") as f:
            f.write("step,lr,loss,smoothed\n")
            for i, (r, loss, s) in enumerate(zip(result.rates, result.losses, result.smoothed), 1):
                f.write(f"{i},{r:.6g},{loss:.6f},{s:.6f}\n")
    settings = {k: getattr(args, k) for k in ("world", "start", "end", "steps", "smooth", "stop_factor", "divisor")}
    log_curve(cfg, result, settings)
    return 0


if __name__ == "__main__":
    run_cli(main)
