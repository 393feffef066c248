"""The training loop of one rank: `Trainer` builds the run (corpus, kernels, model, optimizer,
schedule, step), resumes it, then trains, logs, evaluates and checkpoints until `train.steps`.

Each rank reads its own streams of the training split (`data.streams.TokenStream`), carries every
stream's (h, c) `state` from window to window (detached: truncated BPTT), and DistributedDataParallel
averages the gradients. One step is `training.step.TrainingStep`, queued with no host read: its
verdict (the loss averaged over the ranks by one small all-reduce, the gradient norm, whether the step
failed) stays on the device, and a failed step (a non-finite or diverged loss, a non-finite norm) is
skipped there by the fused optimizer on every rank. The host reads the verdicts only at the steps it
settles at (`Trainer.settles_at`: log, evaluation and checkpoint steps, the last one), where it also
counts and reports failed steps and agrees with the other ranks on a SIGTERM/SIGUSR1 flag, which
stops every rank at that step with a checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import signal
import time
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel

import lstm_dist
from lstm_dist.common import faults
from lstm_dist.common.atomic import atomic_write_text
from lstm_dist.common.distributed import DistEnv, all_objects, cpu_threads, on_every_rank, placement
from lstm_dist.common.errors import first_line
from lstm_dist.config import Config
from lstm_dist.config.schema import duration_seconds
from lstm_dist.data.run_corpus import open_corpus
from lstm_dist.data.streams import TokenStream
from lstm_dist.inference.sampling import sample_prompt_note
from lstm_dist.inference.scoring import LN2
from lstm_dist.model.char_lstm import CharLSTM
from lstm_dist.model import graphs, loops, products
from lstm_dist.model.flops import training_flops_per_token
from lstm_dist.model.kernels import choose_kernels
from lstm_dist.training import checkpoint as ckpt
from lstm_dist.training import lr_rule
from lstm_dist.training.batching import batch_layout
from lstm_dist.training.evaluation import Evaluation
from lstm_dist.training.metrics import NO_METRICS, Metrics, format_duration, format_item, format_rate, format_value
from lstm_dist.training.mfu import matmul_precision, model_flops_utilization, peak_flops
from lstm_dist.training.optim import Schedule, build_optimizer, schedule_phrase
from lstm_dist.training.profiling import StepProfiler
from lstm_dist.training.resume import pick_up
from lstm_dist.training.rundir import RunDirectory
from lstm_dist.training.seeds import init_seed, rank_seed, seed_everything
from lstm_dist.training.state import ModelWeights, Progress, RandomGenerators
from lstm_dist.training.step import TrainingStep
from lstm_dist.training.stopping import (EXIT_PREEMPTED, NonFiniteStop, Preemption, agree_flags,
                                         failed_steps_advice)
from lstm_dist.training.timing import LogInterval, StepClock


def open_metrics(cfg: Config, resumed_at: int | None, derived: dict | None = None) -> Metrics:
    """Rank 0's metrics: the resolved config next to them, and no rows past the step resumed from. A
    fresh start (`resumed_at` None) keeps no rows at all: those of an earlier attempt that left no
    checkpoint (one that failed before its first, or whose checkpoints were set aside) would read as
    this run's."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.run_dir / "config.yaml", cfg.to_yaml())
    w = cfg.log.wandb
    # W&B's config: the settings, and under `derived` what follows from them and the machine (world size,
    # global batch, parameters, vocabulary, the peak rate the rule gives, the code's version)
    config = {**cfg.to_dict(), **({"derived": derived} if derived else {})}
    init = {"tags": [t.strip() for t in w.tags.split(",") if t.strip()] or None, "group": w.group or None,
            "notes": w.notes or None}
    metrics = Metrics(cfg.run_dir, config, wandb_mode=w.mode, project=w.project, entity=w.entity or None,
                      run_name=cfg.run.name, init_timeout=w.init_timeout,
                      wandb_init={k: v for k, v in init.items() if v is not None})
    dropped = metrics.truncate_after(0 if resumed_at is None else resumed_at)
    if resumed_at is None and dropped:
        print(f"starting fresh: {dropped} row(s) of an earlier attempt without a checkpoint removed from "
              f"{cfg.run_dir / 'metrics.jsonl'}", flush=True)
    return metrics


def log_line(step: int, cfg: Config, score: str, values: dict, per: str, eta_s: float) -> str:
    """The training log line a person reads at a glance (under 120 characters on the CPU): step of steps,
    loss and score, rate, throughput in all and per `per` (GPU or process), MFU where the GPU's peak is
    known, peak GPU memory on CUDA, elapsed and `eta_s` (seconds left: the console's alone, a guess rather
    than a measurement); `log.timings` adds where the step's time went. `values` are the row `Trainer._log`
    logs, by their metric names (`train/loss`, `train/<score>`, `perf/chars_per_s`, ...: docs/metrics.md);
    each is in metrics.jsonl and W&B too."""
    parts = [f"step {step}/{cfg.train.steps}", f"loss {values['train/loss']:.4f}",
             f"{score} {values[f'train/{score}']:.4f}", f"lr {format_value(values['train/lr'])}",
             f"{format_rate(values['perf/chars_per_s'])} chars/s "
             f"({format_rate(values['perf/chars_per_s_per_process'])}/{per})"]
    if "perf/mfu" in values:
        parts.append(f"MFU {100 * values['perf/mfu']:.1f}%")
    if "perf/max_memory_gib" in values:
        parts.append(f"mem {values['perf/max_memory_gib']:.1f} GiB")
    if "train/nonfinite_steps" in values:
        parts.append(f"nonfinite_steps {values['train/nonfinite_steps']}")
    parts.append(f"{format_duration(values['perf/elapsed_s'])} elapsed, ETA {format_duration(eta_s)}")
    if cfg.log.timings:
        parts += [format_item(k, values[f"perf/{k}"]) for k in ("data_ms", "fwd_bwd_ms", "opt_ms", "outside_fwd_bwd_pct")]
    return " | ".join(parts)


def start_lines(trainer: "Trainer") -> list[str]:
    """The two lines that start training: what trains where, and the learning rate. Collective
    (`placement()` gathers every rank's host)."""
    t, env, p = trainer.cfg.train, trainer.env, trainer.progress
    anchor = trainer.schedule.anchor
    return [f"training {sum(q.numel() for q in trainer.model.parameters()):,} parameters on {env.world} "
            f"process(es) ({placement()}) × {trainer.layout.describe()} × bptt {t.bptt} ({trainer.device.type}, "
            f"{trainer.kernels.describe()}"
            + (f", {trainer.kernels.products.describe()}" if trainer.device.type == "cpu" else "")
            + f", {torch.get_num_threads()} threads/process); "
            + (f"steps {p.step + 1}..{t.steps}" if p.step < t.steps else f"no step left (at step {p.step} of {t.steps})")
            + f"; run directory {trainer.run_dir}",
            f"learning rate: {lr_rule.explain(trainer.cfg, env.world)}, {schedule_phrase(t)}"
            + (f"; continued from step {anchor[0]} at {anchor[1]:.4g} of the peak (train.resume_schedule)"
               if anchor else "")]


def checkpoint_pieces(trainer: "Trainer") -> ckpt.Pieces:
    """The state a checkpoint holds, from the objects that own it, by key in the file. With `format`,
    `step` (`Progress.step`), `config` and `vocab` (checkpoint.save_training), these keys, in this
    order, are the file's layout (checkpoint.FORMAT 1: keep them so old checkpoints load, or bump it):

        model             the weights, CPU tensors                   ModelWeights
        optimizer         AdamW's (SGD's) state and param groups     the torch optimizer
        nonfinite_total   failed steps in all                        NonFinite
        schedule          the learning-rate schedule's anchor        Schedule
        cpu_matmul        the CPU matrix products chosen, and where   MatmulChoice (None on CUDA)
        ranks[r]          one entry per rank, gathered to rank 0:
          stream          the stream's cursor and layout             TokenStream (decides an exact resume)
          hidden          the carried (h, c) or None                 Progress.state_piece (`state` in the code;
                                                                     the file keeps FORMAT 1's name)
          rng             torch/numpy/python (CUDA) generators       RandomGenerators
    """
    return ckpt.Pieces(
        shared={"model": ModelWeights(trainer.model), "optimizer": trainer.optimizer,
                "nonfinite_total": trainer.progress.nonfinite, "schedule": trainer.schedule,
                "cpu_matmul": MatmulChoice(trainer)},
        per_rank={"stream": trainer.stream, "hidden": trainer.progress.state_piece,
                  "rng": RandomGenerators(trainer.device)})


class MatmulChoice:
    """The CPU matrix products the run chose (`Kernels.products`) as a checkpoint piece: each site's
    implementation and the machine, torch and threads it was measured with (`products.record`; None on
    CUDA). Loading it gives the trainer's model the checkpoint's choice where every rank is where it was
    made, so a resume continues bit for bit (`products.resumed`)."""

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer

    def state_dict(self) -> Optional[dict]:
        return products.record(self.trainer.kernels.products) if self.trainer.device.type == "cpu" else None

    def load_state_dict(self, saved: Optional[dict]) -> None:
        if saved is None or self.trainer.device.type != "cpu":
            return
        tr = self.trainer
        chosen = products.resumed(saved, tr.kernels.products, tr.say, all_objects)
        tr.kernels = dataclasses.replace(tr.kernels, products=chosen)
        tr.model.kernels = tr.kernels  # the layers read it from the model at every window


class Trainer:
    """One rank's run: built and resumed in `__init__`, trained by `run`, released by `close`."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env, self.device = cfg, env, env.device
        t = cfg.train
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(t.threads, env.local_world))
        self.run_dir = cfg.run_dir
        # the global batch's streams, this rank's share of them, and its forward passes (training.batching):
        # first, so that a layout this world size cannot run is refused before anything is read or prepared
        self.layout = layout = batch_layout(t, env.world)
        self.run_lock = RunDirectory(cfg.run_dir)  # claimed in _resume, once the checkpoint is chosen
        corpus = open_corpus(cfg, env, self.say)
        self.vocab = corpus.vocab
        if t.sample_chars and (note := sample_prompt_note(self.vocab, t.sample_prompt)):
            self.say(f"warning: {note}")
        splits = {name: corpus.split(name) for name in ("train", "valid", "test")}
        self.stream = on_every_rank(lambda: TokenStream(splits["train"], env.rank, env.world, layout.per_rank, t.bptt,
                                                        seed=cfg.run.seed, random_offset=cfg.data.random_offset))
        seed_everything(init_seed(cfg.run.seed))
        self.kernels = choose_kernels(cfg.model, t.precision, self.device, batch=t.batch_size, say=self.say,
                                      tf32=t.tf32, bptt=t.bptt, vocab=self.vocab.size)
        self.model = CharLSTM.from_config(cfg.model, self.vocab.size, kernels=self.kernels).to(self.device)
        self.optimizer = build_optimizer(self.model, t)
        # the documented rule: train.lr scaled to this run's batch, width, depth
        self.schedule = Schedule(t, lr_rule.peak_lr(cfg, env.world))
        # A loss this far above a uniform guess's (ln V nats) has diverged: the step fails like a non-finite one.
        self.max_loss = t.divergence_ratio * math.log(self.vocab.size)
        self.progress = Progress(t.max_nonfinite, self.device)
        self.pieces = checkpoint_pieces(self)
        resumed = self._resume()
        # gradient_as_bucket_view: the parameters' .grad are views into DDP's all-reduce buckets, so no copy
        # of every gradient in and out of the buckets each step (the same sums, bit for bit). Bucket sizes
        # stay DDP's: docs/gpu.md ("Gradient all-reduce") says why they already follow the layers.
        self.ddp_model = (DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                                  else None, gradient_as_bucket_view=True)
                          if env.distributed else self.model)
        if env.distributed and self.device.type == "cuda" and hasattr(self.ddp_model, "_set_ddp_runtime_logging_sample_rate"):
            # DDP times its own steps with CUDA events and waits for them in the first 10 iterations and
            # then every 100 (its runtime logging): a host synchronisation inside a step. Only the first 10.
            self.ddp_model._set_ddp_runtime_logging_sample_rate(2**31 - 1)
        self.training_step = TrainingStep(self.ddp_model, self.model, self.optimizer, t.clip_norm, self.kernels.autocast,
                                          max_loss=self.max_loss, world=env.world, micro_batches=layout.accumulation)
        self.clock = StepClock(self.device)
        self.pending: list[torch.Tensor] = []  # the verdicts of the steps queued since the host last read them
        self._compile_agreed = False  # whether a failed compiled step was agreed on (and said) already
        self.budget_s = duration_seconds(cfg.train.max_time)  # train.max_time (math.inf: none)
        self._budget_from: Optional[tuple[float, int]] = None  # (monotonic time, step) this start's training began at
        self.out_of_time = False  # every rank agreed that train.max_time passes before the next settle
        self._graphs_agreed = False  # likewise a failed CUDA graph capture
        self.evaluation = Evaluation(cfg, env, self.model, self.vocab, splits, self.kernels.bf16, self.say)
        at = self.progress.step if resumed else None
        # MFU (`training.mfu`, on CUDA): the model's training FLOPs per character (`model.flops`: layers and
        # head) × chars/s over all ranks, one GPU each, over the GPU's dense peak in this run's arithmetic (bf16
        # autocast, TF32 or fp32 products); no peak (so no MFU) where the GPU is not in the table
        m = cfg.model
        self.flops_per_char = training_flops_per_token(m.embedding, m.hidden, m.layers, self.vocab.size)
        self.peak_flops = (peak_flops(torch.cuda.get_device_name(self.device),
                                      matmul_precision(self.kernels.bf16, self.kernels.tf32))
                           if self.device.type == "cuda" else None)
        derived = {"world_size": env.world, "global_batch_size": layout.global_batch,
                   "gradient_accumulation_steps": layout.accumulation, "chars_per_step": layout.global_batch * t.bptt,
                   "parameters": sum(q.numel() for q in self.model.parameters()), "vocab_size": self.vocab.size,
                   "peak_lr": self.schedule.peak, "kernels": self.kernels.describe(), "version": lstm_dist.__version__}
        self.metrics = on_every_rank(lambda: open_metrics(cfg, at, derived) if env.is_main else NO_METRICS)

    def _init_from(self) -> None:
        """A fresh run's weights from `checkpoint.init_from` (fine-tuning): every rank reads them (a collective;
        a file that cannot be read or another model or vocabulary is one line on every rank); the step, the
        optimizer and the schedule stay this run's fresh ones."""
        path, step, weights = on_every_rank(lambda: ckpt.init_weights(self.cfg, self.vocab))

        def load() -> None:
            try:
                self.model.load_state_dict(weights)
            except (RuntimeError, KeyError) as exc:
                raise ckpt.CheckpointError(f"checkpoint.init_from: {path} does not fit this model: "
                                           f"{first_line(exc)}") from None

        on_every_rank(load)
        self.say(f"starting from the weights of {path} (step {step}; checkpoint.init_from): step 0, a fresh "
                 "optimizer and learning-rate schedule, this config's settings")

    def _resume(self) -> bool:
        """Resume per `checkpoint.resume`, or seed this rank's generators for a fresh start; True when resumed."""
        chosen = ckpt.choose_resume(self.cfg, self.env, self.vocab, self.say)  # rank 0 reads; nothing is written
        # The run directory is ours, and shared by every rank, before any rank reads the chosen file; a run
        # refused for its checkpoint (above) has left the directory as it was.
        self.run_lock.claim(self.env)
        if chosen is None:
            if self.cfg.checkpoint.init_from:
                self._init_from()
            elif self.cfg.checkpoint.resume == "auto":
                self.say(f"no checkpoint in {ckpt.checkpoint_dir(self.run_dir)}: starting fresh")
            seed_everything(rank_seed(self.cfg.run.seed, self.env.rank))
            return False
        resumed = ckpt.restore(chosen, self.cfg, self.env, self.pieces)
        self.progress.step = self.progress.saved_at = resumed.step
        pick_up(resumed, self.cfg, self.env, self.schedule, self.say)
        return True

    def say(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)

    def save_checkpoint(self) -> None:
        t0, p = time.perf_counter(), self.progress
        path = ckpt.save_training(self.cfg, self.env, self.vocab, p.step, self.pieces)
        p.saved_at = p.step
        if path is not None:
            self.say(f"checkpoint {path} ({time.perf_counter() - t0:.2f}s)")

    def train_step(self) -> None:
        """One window on every rank, queued on the device with no host read (`training.step`): its
        verdict (mean loss, norm, failed) joins `pending` and the clock has its four marks."""
        p, clock = self.progress, self.clock
        clock.mark()
        batch = self.stream.next()
        x, y = batch.x, batch.y
        if self.device.type == "cuda":  # pinned, so that the copy is queued and the host runs on
            x, y = x.pin_memory(), y.pin_memory()
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if batch.reset or p.state is None:
            p.state = self.model.init_state(x.shape[0], device=self.device)
        if faults.armed("compile-fails-later", p.step + 1):  # as a compiled step that raised in this step
            loops.disable_compile(f"injected by LSTM_DIST_FAULT=compile-fails-later at step {p.step + 1}")
        if faults.armed("graphs-fail-later", p.step + 1):  # as a capture that raised in this step
            graphs.disable(f"injected by LSTM_DIST_FAULT=graphs-fail-later at step {p.step + 1}")
        clock.mark()
        loss = self.training_step.forward_backward(x, y, p.state, poison=faults.armed("nonfinite", p.step + 1))
        clock.mark()
        record = self.training_step.verdict(loss, self.training_step.clip())
        p.step += 1
        p.state = self.training_step.apply(self.schedule.lr(p.step), failed=record[2])
        clock.mark()
        self.pending.append(record)

    def settle(self, window: LogInterval, preemption: Preemption) -> tuple[float, bool]:
        """The host's look at the steps queued since the last one, at a step every rank settles at (a log,
        evaluation or checkpoint step, the last one): their verdicts read back in one copy, each step's
        failure counted and warned about in order, each step's loss and phases into `window`; then one
        all-reduce of the stop flag and of whether a compiled step or a CUDA graph capture failed here
        (then every rank runs uncompiled, or without graphs, from here on: `_agree_compile_failure`,
        `_agree_graphs_failure`). Returns (the last step's gradient norm, whether any rank was asked
        to stop). Raises NonFiniteStop at the first step that made `train.max_nonfinite` failures in a
        row (the steps queued after it ran, their updates lost with the run)."""
        p = self.progress
        records = torch.stack(self.pending).tolist() if self.pending else []
        self.pending = []
        phases = self.clock.take()
        first = p.step - len(records) + 1
        norm = math.nan
        for i, ((loss, norm, failed), spent) in enumerate(zip(records, phases)):
            step = first + i
            window.add(loss, spent)
            if failed:
                self.say(p.nonfinite.skipped(step, loss, norm, self.max_loss))
                if p.nonfinite.exhausted:
                    if step != p.step:
                        self.say(f"(read at step {p.step}: the steps queued after {step} ran, and are dropped with the run)")
                    raise NonFiniteStop(failed_steps_advice(p.nonfinite, self.run_dir, self.env.is_main))
            else:
                p.nonfinite.ok()
        stop, compile_failed, graphs_failed, self.out_of_time = agree_flags(
            [preemption.requested, loops.compile_failure() is not None, graphs.failure() is not None,
             self._budget_passes_before_next_settle()], self.device)
        if compile_failed and not self._compile_agreed:
            self._agree_compile_failure()
        if graphs_failed and not self._graphs_agreed:
            self._agree_graphs_failure()
        return norm, stop

    def _budget_passes_before_next_settle(self) -> bool:
        """Whether training on to the next step every rank settles at would pass `train.max_time` on this
        rank: the time since this start's first step plus the steps to there at this start's mean step time
        (the first step's compile and warm-up included, so the estimate errs early)."""
        p = self.progress
        if self.budget_s == math.inf or self._budget_from is None or p.step >= self.cfg.train.steps:
            return False
        since, first = self._budget_from
        elapsed, done = time.monotonic() - since, p.step - first
        nxt = next(s for s in range(p.step + 1, self.cfg.train.steps + 1) if self.settles_at(s))
        return elapsed + (elapsed / max(done, 1)) * (nxt - p.step) > self.budget_s

    def _agree_compile_failure(self) -> None:
        """A compiled step failed on some rank since the last settle (`loops.compile_failure`): every rank
        runs the same steps uncompiled from here on, and rank 0 says so once, naming the first rank and why."""
        self._compile_agreed = True
        reasons = all_objects(loops.compile_failure())
        rank, why = next((r, w) for r, w in enumerate(reasons) if w is not None)
        loops.disable_compile(why)
        what = ("every rank runs the same pointwise steps uncompiled from here on"
                if self.kernels.compiles() else f"this run's kernels ({self.kernels.describe()}) compile nothing")
        self.say(f"warning: the compiled LSTM step failed on rank {rank} by step {self.progress.step} ({why}); {what}"
                 " (model.compile=false skips compiling)")

    def _agree_graphs_failure(self) -> None:
        """A CUDA graph capture failed on some rank since the last settle (`graphs.failure`): every rank
        runs the same loops without graphs from here on, and rank 0 says so once, naming the first rank and why."""
        self._graphs_agreed = True
        reasons = all_objects(graphs.failure())
        rank, why = next((r, w) for r, w in enumerate(reasons) if w is not None)
        graphs.disable(why)
        what = ("every rank runs the same loops without graphs from here on" if self.kernels.graphs
                else f"this run's kernels ({self.kernels.describe()}) record no graphs")
        self.say(f"warning: a CUDA graph of the LSTM loops failed on rank {rank} by step {self.progress.step} ({why});"
                 f" {what} (model.cuda_graphs=false skips them)")

    def settles_at(self, step: int) -> bool:
        """Whether the host reads the queued steps at `step`: the same steps on every rank (a collective)."""
        t, cfg = self.cfg.train, self.cfg
        at = lambda n: bool(n) and step % n == 0  # noqa: E731
        return step == t.steps or at(cfg.log.every) or at(t.eval_every) or at(cfg.checkpoint.every)

    def run(self, preemption: Preemption) -> int:
        """Train to `train.steps` (exit status 0), or to a stop every rank agreed on (EXIT_PREEMPTED,
        after a checkpoint). Raises NonFiniteStop on too many failed steps or a diverged final score.

        Between two steps the host settles at (`settles_at`) it reads nothing from the device: it queues
        steps. A stop signal is therefore agreed at the next step settled at (every `log.every` steps at
        most), and a failed step is warned about there."""
        cfg, t, p = self.cfg, self.cfg.train, self.progress
        for line in start_lines(self):
            self.say(line)
        window = LogInterval(self.layout.global_batch * t.bptt)
        every = lambda n: n and p.step % n == 0 and p.step < t.steps  # noqa: E731  (not at the end)
        self._budget_from, self.out_of_time = (time.monotonic(), p.step), False
        profiler = StepProfiler(cfg.log.profile_steps, self.run_dir, self.device, self.env.is_main, self.say)
        while p.step < t.steps:
            window.begin()
            profiler.before(p.step + 1)
            self.train_step()
            profiler.after(p.step)
            stop = False
            if self.settles_at(p.step):
                norm, stop = self.settle(window, preemption)
            window.end()
            faults.after_step(p.step)
            if p.step % cfg.log.every == 0 or p.step == t.steps:
                self._log(window, norm)
            if stop:
                self.say(f"stop requested ({signal.Signals(preemption.signal).name if preemption.requested else 'on another rank'}):"
                         f" checkpointing at step {p.step} and exiting with {EXIT_PREEMPTED}; "
                         "run the same command to resume")
                self.save_checkpoint()
                return EXIT_PREEMPTED
            if self.out_of_time:
                spent = datetime.timedelta(seconds=round(time.monotonic() - self._budget_from[0]))
                self.say(f"time budget: train.max_time={t.max_time} would pass before the next log step ({spent} spent "
                         f"of {datetime.timedelta(seconds=round(self.budget_s))}); checkpointing at step {p.step} of {t.steps} and exiting with 0, "
                         "without the final evaluation; run the same command to continue (with a new budget)")
                self.save_checkpoint()
                return 0
            if every(t.eval_every):
                self.evaluation.periodic(p.step, self.metrics)
            # No periodic checkpoint inside a run of non-finite steps: the newest ones stay healthy ones.
            if every(cfg.checkpoint.every) and p.nonfinite.run == 0:
                self.save_checkpoint()
        if p.saved_at != p.step:  # not a file's existence: a damaged file of that name is no checkpoint
            self.save_checkpoint()
        self.evaluation.final(p.step, self.metrics)
        return 0

    def _log(self, window: LogInterval, norm: float) -> None:
        """The log step's row, grouped as W&B users read them (docs/metrics.md): `train/` what training
        computes (epoch, loss, bits per token named after the vocabulary as the evaluations name theirs,
        rate, gradient norm, failed steps so far), `perf/` how fast (throughput, phases, elapsed, MFU and
        peak memory on CUDA). To the console, metrics.jsonl and W&B; the time left goes to the console
        only (a guess, not a measurement)."""
        p, score = self.progress, self.vocab.units.score
        loss, timing = window.take(self.cfg.train.steps - p.step)
        eta_s = timing.pop("eta_s")
        values = {"train/epoch": self.stream.epoch, "train/loss": loss, f"train/{score}": loss / LN2,
                  "train/lr": self.schedule.lr(p.step), "train/grad_norm": norm,
                  **{f"perf/{k}": v for k, v in timing.items()},
                  "perf/chars_per_s_per_process": timing["chars_per_s"] / self.env.world,
                  "perf/elapsed_s": time.monotonic() - self._budget_from[0]}
        if self.device.type == "cuda":
            mfu = model_flops_utilization(timing["chars_per_s"], self.flops_per_char, self.env.world, self.peak_flops)
            if mfu is not None:
                values["perf/mfu"] = mfu
            # the caching allocator's own count: no device synchronisation
            values["perf/max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if p.nonfinite.total:
            values["train/nonfinite_steps"] = p.nonfinite.total
        self.metrics.log(p.step, values, line=log_line(p.step, self.cfg, score, values,
                                                        "GPU" if self.device.type == "cuda" else "process", eta_s))

    def close(self) -> None:
        self.metrics.close()
        self.run_lock.release()
