"""The training loop of one rank: `Trainer` builds the run (corpus, kernels, model, optimizer,
schedule, step), resumes it, then trains, logs, evaluates and checkpoints until `train.steps`.

Each rank reads its own streams of the training split (`data.streams.TokenStream`), carries every
stream's (h, c) `state` from window to window (detached: truncated BPTT), and DistributedDataParallel
averages the gradients. One step is `training.step.TrainingStep`; between its parts the ranks share
the loss and the stop flag in one all-reduce (`stopping.agree`): a non-finite or diverged loss, or a
non-finite gradient norm, skips the optimizer step on every rank, and a SIGTERM/SIGUSR1 flag stops
every rank at the same step boundary with a checkpoint.
"""

from __future__ import annotations

import math
import signal
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from lstm_dist.common import faults
from lstm_dist.common.atomic import atomic_write_text
from lstm_dist.common.distributed import DistEnv, cpu_threads, on_every_rank, placement
from lstm_dist.config import Config
from lstm_dist.data.run_corpus import open_corpus
from lstm_dist.data.streams import TokenStream
from lstm_dist.inference.sampling import sample_prompt_note
from lstm_dist.inference.scoring import LN2
from lstm_dist.model.char_lstm import CharLSTM
from lstm_dist.model.kernels import choose_kernels
from lstm_dist.training import checkpoint as ckpt
from lstm_dist.training import lr_rule
from lstm_dist.training.evaluation import SAMPLE_PROMPT, Evaluation
from lstm_dist.training.metrics import NO_METRICS, Metrics
from lstm_dist.training.optim import Schedule, build_optimizer, schedule_phrase
from lstm_dist.training.resume import pick_up
from lstm_dist.training.rundir import RunDirectory
from lstm_dist.training.seeds import init_seed, rank_seed, seed_everything
from lstm_dist.training.state import ModelWeights, Progress, RandomGenerators
from lstm_dist.training.step import TrainingStep
from lstm_dist.training.stopping import (EXIT_PREEMPTED, NonFiniteStop, Preemption, agree,
                                         failed_steps_advice)
from lstm_dist.training.timing import LogInterval


def open_metrics(cfg: Config, resumed_at: int | None) -> Metrics:
    """Rank 0's metrics: the resolved config next to them, and no rows past the step resumed from. A
    fresh start (`resumed_at` None) keeps no rows at all: those of an earlier attempt that left no
    checkpoint (one that failed before its first, or whose checkpoints were set aside) would read as
    this run's."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.run_dir / "config.yaml", cfg.to_yaml())
    w = cfg.log.wandb
    metrics = Metrics(cfg.run_dir, cfg.to_dict(), wandb_mode=w.mode, project=w.project, entity=w.entity or None,
                      run_name=cfg.run.name, init_timeout=w.init_timeout)
    dropped = metrics.truncate_after(0 if resumed_at is None else resumed_at)
    if resumed_at is None and dropped:
        print(f"starting fresh: {dropped} row(s) of an earlier attempt without a checkpoint removed from "
              f"{cfg.run_dir / 'metrics.jsonl'}", flush=True)
    return metrics


def start_lines(trainer: "Trainer") -> list[str]:
    """The two lines that start training: what trains where, and the learning rate. Collective
    (`placement()` gathers every rank's host)."""
    t, env, p = trainer.cfg.train, trainer.env, trainer.progress
    anchor = trainer.schedule.anchor
    return [f"training {sum(q.numel() for q in trainer.model.parameters()):,} parameters on {env.world} "
            f"process(es) ({placement()}) × {t.batch_size} streams × bptt {t.bptt} ({trainer.device.type}, "
            f"{trainer.kernels.precision()}, {torch.get_num_threads()} threads/process); "
            f"steps {p.step + 1}..{t.steps}; run directory {trainer.run_dir}",
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
        ranks[r]          one entry per rank, gathered to rank 0:
          stream          the stream's cursor and layout             TokenStream (decides an exact resume)
          hidden          the carried (h, c) or None                 Progress.state_piece (`state` in the code;
                                                                     the file keeps FORMAT 1's name)
          rng             torch/numpy/python (CUDA) generators       RandomGenerators
    """
    return ckpt.Pieces(
        shared={"model": ModelWeights(trainer.model), "optimizer": trainer.optimizer,
                "nonfinite_total": trainer.progress.nonfinite, "schedule": trainer.schedule},
        per_rank={"stream": trainer.stream, "hidden": trainer.progress.state_piece,
                  "rng": RandomGenerators(trainer.device)})


class Trainer:
    """One rank's run: built and resumed in `__init__`, trained by `run`, released by `close`."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env, self.device = cfg, env, env.device
        t = cfg.train
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(t.threads, env.local_world))
        self.run_dir = cfg.run_dir
        self.run_lock = RunDirectory(cfg.run_dir)  # claimed in _resume, once the checkpoint is chosen
        corpus = open_corpus(cfg, env, self.say)
        self.vocab = corpus.vocab
        if t.sample_chars and (note := sample_prompt_note(self.vocab, SAMPLE_PROMPT)):
            self.say(f"warning: {note}")
        splits = {name: corpus.split(name) for name in ("train", "valid", "test")}
        self.stream = on_every_rank(lambda: TokenStream(splits["train"], env.rank, env.world, t.batch_size, t.bptt,
                                                        seed=cfg.run.seed, random_offset=cfg.data.random_offset))
        seed_everything(init_seed(cfg.run.seed))
        self.kernels = choose_kernels(cfg.model, t.precision, self.device, batch=t.batch_size, say=self.say,
                                      tf32=t.tf32)
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
        # of every gradient in and out of the buckets each step (the same sums, bit for bit).
        self.ddp_model = (DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                                  else None, gradient_as_bucket_view=True)
                          if env.distributed else self.model)
        self.training_step = TrainingStep(self.ddp_model, self.model, self.optimizer, t.clip_norm, self.kernels.autocast)
        self.evaluation = Evaluation(cfg, env, self.model, self.vocab, splits, self.kernels.bf16, self.say)
        at = self.progress.step if resumed else None
        self.metrics = on_every_rank(lambda: open_metrics(cfg, at) if env.is_main else NO_METRICS)

    def _resume(self) -> bool:
        """Resume per `checkpoint.resume`, or seed this rank's generators for a fresh start; True when resumed."""
        chosen = ckpt.choose_resume(self.cfg, self.env, self.vocab, self.say)  # rank 0 reads; nothing is written
        # The run directory is ours, and shared by every rank, before any rank reads the chosen file; a run
        # refused for its checkpoint (above) has left the directory as it was.
        self.run_lock.claim(self.env)
        if chosen is None:
            if self.cfg.checkpoint.resume == "auto":
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

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def save_checkpoint(self) -> None:
        t0, p = time.perf_counter(), self.progress
        path = ckpt.save_training(self.cfg, self.env, self.vocab, p.step, self.pieces)
        p.saved_at = p.step
        if path is not None:
            self.say(f"checkpoint {path} ({time.perf_counter() - t0:.2f}s)")

    def train_step(self, preempt_flag: float) -> tuple[float, float, bool, list[float]]:
        """One window on every rank. Returns (mean loss, pre-clip grad norm, preempt agreed, [data, fwd+bwd, opt] seconds)."""
        p = self.progress
        t0 = time.perf_counter()
        batch = self.stream.next()
        x = batch.x.to(self.device, non_blocking=True)
        y = batch.y.to(self.device, non_blocking=True)
        if batch.reset or p.state is None:
            p.state = self.model.init_state(x.shape[0], device=self.device)
        t1 = time.perf_counter()
        loss = self.training_step.forward_backward(x, y, p.state, poison=faults.armed("nonfinite", p.step + 1))
        self._sync()
        t2 = time.perf_counter()
        norm = float(self.training_step.clip())
        mean_loss, any_bad, stop = agree(loss, preempt_flag, self.env.world)
        p.step += 1
        if any_bad or not math.isfinite(norm) or (self.max_loss and mean_loss > self.max_loss):
            self.training_step.discard()
            p.state = None  # a non-finite forward poisons the carried state: every rank restarts from zeros
            self.say(p.nonfinite.skipped(p.step, mean_loss, norm, self.max_loss))
            if p.nonfinite.exhausted:
                raise NonFiniteStop(failed_steps_advice(p.nonfinite, self.run_dir, self.env.is_main))
        else:
            p.state = self.training_step.apply(self.schedule.lr(p.step))
            p.nonfinite.ok()
        self._sync()
        t3 = time.perf_counter()
        return mean_loss, norm, stop, [t1 - t0, t2 - t1, t3 - t2]

    def run(self, preemption: Preemption) -> int:
        """Train to `train.steps` (exit status 0), or to a stop every rank agreed on (EXIT_PREEMPTED,
        after a checkpoint). Raises NonFiniteStop on too many failed steps or a diverged final score."""
        cfg, t, p = self.cfg, self.cfg.train, self.progress
        for line in start_lines(self):
            self.say(line)
        window = LogInterval(self.env.world * t.batch_size * t.bptt)
        every = lambda n: n and p.step % n == 0 and p.step < t.steps  # noqa: E731  (not at the end)
        while p.step < t.steps:
            window.begin()
            loss, norm, stop, phases = self.train_step(1.0 if preemption.requested else 0.0)
            faults.after_step(p.step)
            window.add(loss, phases)
            if p.step % cfg.log.every == 0 or p.step == t.steps:
                self._log(window, norm)
            window.end()
            if stop:
                self.say(f"stop requested ({signal.Signals(preemption.signal).name if preemption.requested else 'on another rank'}):"
                         f" checkpointing at step {p.step} and exiting with {EXIT_PREEMPTED}; "
                         "run the same command to resume")
                self.save_checkpoint()
                return EXIT_PREEMPTED
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
        p = self.progress
        loss, timing = window.take(self.cfg.train.steps - p.step)
        values = {"epoch": self.stream.epoch, "loss": loss, "bpc": loss / LN2, "lr": self.schedule.lr(p.step),
                  "grad_norm": norm, **timing}
        if p.nonfinite.total:
            values["nonfinite_steps"] = p.nonfinite.total
        self.metrics.log(p.step, values)

    def close(self) -> None:
        self.metrics.close()
        self.run_lock.release()
