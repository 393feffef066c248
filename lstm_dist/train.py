"""Train the character LSTM: `python -m lstm_dist.train --config FILE [section.key=value ...]`.

One machine, all its GPUs (or 2 CPU processes for the smoke run):

    torchrun --standalone --nproc_per_node=2 -m lstm_dist.train --config configs/smoke.yaml
    torchrun --standalone --nproc_per_node=gpu -m lstm_dist.train --config configs/wikitext103.yaml

Several machines started by hand: `launch/multinode.sh`, the same command on each node with its
NODE_RANK 0..N-1 (it runs torchrun with --nnodes, --node_rank, --master_addr and --master_port):

    NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/multinode.sh configs/wikitext103.yaml

A plain `python -m lstm_dist.train ...` is a world of one.

Each rank reads its own streams of the training split (`streams.TokenStream`), carries every stream's
(h, c) from window to window (detached: truncated BPTT), and DistributedDataParallel averages the
gradients. The global gradient norm is clipped after that all-reduce, so every rank clips alike. A
non-finite loss or gradient skips the optimizer step on every rank. SIGTERM or SIGUSR1 only set a
flag; at the next step boundary the ranks agree on it, write a checkpoint and exit with
EXIT_PREEMPTED so that a batch script can requeue the job.

Exit status: 0 done; 2 a user error (one line on stderr); 3 stopped after too many consecutive
non-finite steps; 75 preempted after writing a checkpoint (resume with the same command).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lstm_dist.training import checkpoint as ckpt
from lstm_dist.common import faults
from lstm_dist.training import lr_rule
from lstm_dist import config as config_mod
from lstm_dist.common.atomic import atomic_write_text
from lstm_dist.config import Config
from lstm_dist.data.corpus import Corpus, builtin_source_for
from lstm_dist.common.distributed import DistEnv, on_every_rank, all_objects, autocast, cpu_threads, placement, setup
from lstm_dist.common.errors import EXIT_USER_ERROR, EveryRankError, UserError, print_error, run_cli
from lstm_dist.model import cpu_loops
from lstm_dist.model import lstm
from lstm_dist.model.lstm import probe_compile
from lstm_dist.training.metrics import NO_METRICS, Metrics
from lstm_dist.model.char_lstm import CharLSTM
from lstm_dist.training.optim import Schedule, build_optimizer, schedule_phrase, set_lr
from lstm_dist.training.rundir import RunDirectory
from lstm_dist.inference.sampling import sample_prompt_note, sample_text
from lstm_dist.inference.scoring import LN2, split_bits
from lstm_dist.training.seeds import init_seed, rank_seed, recut_seed, sample_seed, seed_everything
from lstm_dist.training.stopping import NonFinite, NonFiniteStop, Preemption, agree
from lstm_dist.data.streams import TokenStream
from lstm_dist.training.timing import LogInterval

EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; slurm/train.sh requeues on it
SAMPLE_PROMPT = "The "


# ---------------------------------------------------------------------------------------- pieces


def open_corpus(cfg: Config, env: DistEnv, say) -> Corpus:
    """The prepared corpus; a built-in source's default location is prepared by rank 0 on first use.
    Every rank checks the same things; a problem any of them finds stops all of them together."""
    path = Path(cfg.data.path)

    def prepare_if_missing() -> None:
        if path.exists():
            return
        source = builtin_source_for(path)
        if source is None:
            raise UserError(f"data.path {path} does not exist; prepare a corpus there first "
                            f"(python -m lstm_dist.data prepare --source ... --out {path}) or point data.path at one")
        if env.is_main:
            say(f"data.path {path} does not exist: preparing the built-in '{source}' corpus there "
                f"({cfg.data.vocab} vocabulary); the other ranks wait")
            from lstm_dist.data.prepare import prepare  # only here: a run on a prepared corpus imports nothing of preparation

            prepare(source, path, vocab=cfg.data.vocab)

    on_every_rank(prepare_if_missing)  # the other ranks wait here for rank 0's preparation
    return on_every_rank(lambda: scorable(Corpus(path)))


def scorable(corpus: Corpus) -> Corpus:
    """The corpus, if its valid and test splits have something to score: the first character of a
    split is only context, so a split of one character would score nothing, and a run on it would
    end with a perfect 0 bits per character from no evidence. Raises UserError (before training)."""
    for split in ("valid", "test"):
        n = corpus.sizes[split]
        if n < 2:
            raise UserError(f"the {split} split of {corpus.path} has {n} token(s), so there is nothing to score in it "
                            "(the first is only context); re-prepare the corpus with a longer "
                            f"{split} text (python -m lstm_dist.data prepare ... --force)")
    return corpus


# ---------------------------------------------------------------------------------------- trainer


def describe(trainer: "Trainer", where: str) -> str:
    t = trainer.cfg.train
    return (f"training {sum(p.numel() for p in trainer.model.parameters()):,} parameters on {trainer.env.world} "
            f"process(es) ({where}) × {t.batch_size} streams × bptt {t.bptt} ({trainer.device.type}, "
            f"{'bf16' if trainer.bf16 else 'fp32'}, {torch.get_num_threads()} threads/process); "
            f"steps {trainer.step + 1}..{t.steps}; run directory {trainer.run_dir}")


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


class Trainer:
    """One rank's run: the corpus, model and optimizer, the step, evaluations and checkpoints."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env, self.device = cfg, env, env.device
        t = cfg.train
        self.bf16 = self.device.type == "cuda" and t.precision in ("auto", "bf16")
        if t.precision == "bf16" and self.device.type != "cuda":
            self.say("note: train.precision=bf16 applies on CUDA only; this CPU run computes in fp32")
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(t.threads, env.local_world))
        self.run_dir = cfg.run_dir
        self.run_directory = RunDirectory(cfg.run_dir)  # locked and checked for sharing by _resume
        corpus = open_corpus(cfg, env, self.say)
        self.vocab = corpus.vocab
        if t.sample_chars and (note := sample_prompt_note(self.vocab, SAMPLE_PROMPT)):
            self.say(f"warning: {note}")
        self.splits = {name: corpus.split(name) for name in ("train", "valid", "test")}
        self.stream = on_every_rank(lambda: TokenStream(self.splits["train"], env.rank, env.world, t.batch_size, t.bptt,
                                                 seed=cfg.run.seed, random_offset=cfg.data.random_offset))
        seed_everything(init_seed(cfg.run.seed))
        self.model = CharLSTM.from_config(cfg.model, self.vocab.size).to(self.device)
        self._agree_on_compile()
        self._agree_on_cpu_loops()
        self.optimizer = build_optimizer(self.model, t)
        self.peak_lr = lr_rule.peak_lr(cfg, env.world)  # the documented rule: train.lr scaled to this run's batch, width, depth
        self.schedule = Schedule(t, self.peak_lr)
        # A loss this far above a uniform guess's (ln V nats) has diverged: the step fails like a non-finite one.
        self.max_loss = t.divergence_ratio * math.log(self.vocab.size)
        self.step = 0
        self.saved_at: int | None = None  # the step of the checkpoint last written or resumed from
        self.nonfinite = NonFinite(t.max_nonfinite)
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        resumed = self._resume()
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
                    if env.distributed else self.model)
        self.metrics = on_every_rank(lambda: open_metrics(cfg, self.step if resumed else None) if env.is_main else NO_METRICS)

    def say(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)

    def _agree_on_compile(self) -> None:
        """Compile the LSTM step on every rank now; if any rank cannot, every rank runs it eager and
        rank 0 says which rank failed and why (one slow rank would slow every step of the job)."""
        if not self.model.compile:
            return
        failure = ("injected by LSTM_DIST_FAULT=compile-fails" if faults.armed("compile-fails", 0)
                   else probe_compile(self.cfg.train.batch_size, self.cfg.model.hidden, self.device))
        failed = [(rank, why) for rank, why in enumerate(all_objects(failure)) if why is not None]
        if failed:
            self.model.compile = False
            rank, why = failed[0]
            self.say(f"warning: torch.compile of the LSTM step failed on rank {rank} ({why}); "
                     f"every rank runs the eager step")

    def _agree_on_cpu_loops(self) -> None:
        """Build (or load) the C++ time loops on every rank now (lstm_dist.cpu_loops); if any rank
        cannot, every rank runs the eager loops and rank 0 says which rank failed and why."""
        if self.device.type != "cpu" or self.model.impl != "fast" or not lstm.CPU_LOOPS:
            return
        failure = ("injected by LSTM_DIST_FAULT=cpu-loops-fail" if faults.armed("cpu-loops-fail", 0)
                   else None if cpu_loops.get() is not None else cpu_loops.failure())
        failed = [(rank, why) for rank, why in enumerate(all_objects(failure)) if why is not None]
        if failed:
            lstm.CPU_LOOPS = False
            rank, why = failed[0]
            self.say(f"warning: the C++ LSTM loops are not available on rank {rank} ({why}); "
                     f"every rank runs the eager loops (slower on the CPU, the same numbers to ~5e-7)")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _resume(self) -> bool:
        seed, rank = self.cfg.run.seed, self.env.rank
        r = ckpt.restore(self.cfg, self.env, self.vocab, self.model, self.optimizer, self.stream, self.say,
                         claim=lambda: self.run_directory.claim(self.env))
        if r is None:
            if self.cfg.checkpoint.resume == "auto":
                self.say(f"no checkpoint in {ckpt.checkpoint_dir(self.run_dir)}: starting fresh")
            seed_everything(rank_seed(seed, rank))
            return False
        self.step, self.nonfinite.total, self.state = r.step, r.nonfinite_total, r.hidden
        self.saved_at = r.step
        if r.exact:
            self.say(f"resumed from {r.path} at step {self.step}")
        else:
            seed_everything(recut_seed(seed, rank, self.step))
            t = self.cfg.train
            self.say(f"resumed from {r.path} at step {self.step}: it was written by {r.written_by}; re-cut streams "
                     f"for {self.env.world} × {t.batch_size} × {t.bptt}: position carried over by characters "
                     "consumed, hidden states start at zero")
        for key, old, new in config_mod.changes(r.config, self.cfg):
            self.say(f"resumed with a changed setting: {key}: {old!r} → {new!r}")
        self._resume_schedule(r)
        return True

    def _resume_schedule(self, r: ckpt.Resumed) -> None:
        """Put back the learning-rate schedule the checkpoint's run was on; where this run's settings
        give another, follow `train.resume_schedule` and say in one line what the rates become."""
        saved = config_mod.from_dict(r.config, source=f"the config inside checkpoint {r.path}")
        old = Schedule(saved.train, lr_rule.peak_lr(saved, r.world))
        old.load_state_dict(r.schedule)
        self.schedule.anchor = old.anchor
        if self.schedule.shape() == old.shape() or self.step >= self.cfg.train.steps:
            return
        was, t = old.lr(self.step), self.cfg.train
        recomputed = Schedule(t, self.peak_lr).lr(self.step + 1)
        if t.resume_schedule == "continue":
            self.schedule.continued(self.step, old)
            self.say(f"learning-rate schedule continued from the checkpoint's (train.resume_schedule=continue): "
                     f"{was:.4g} at step {self.step}, {self.schedule.lr(self.step + 1):.4g} at step {self.step + 1}, "
                     f"{self.schedule.lr(t.steps):.4g} at step {t.steps} (recompute would give {recomputed:.4g} "
                     f"at step {self.step + 1})")
        else:
            self.schedule.anchor = None
            self.say(f"learning-rate schedule recomputed for the new settings (train.resume_schedule=recompute): "
                     f"{was:.4g} at step {self.step}, {recomputed:.4g} at step {self.step + 1}")

    def save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        path = ckpt.save_training(self.cfg, self.env, self.vocab, self.step, self.model, self.optimizer,
                                  self.stream, self.state, self.nonfinite.total, self.schedule.state_dict())
        self.saved_at = self.step
        if path is not None:
            self.say(f"checkpoint {path} ({time.perf_counter() - t0:.2f}s)")

    def evaluate(self, split: str, max_windows: int = 0) -> tuple[float, int]:
        bits, count = split_bits(self.model, self.splits[split], rank=self.env.rank, world=self.env.world,
                                 batch=self.cfg.train.batch_size, bptt=self.cfg.train.bptt, device=self.device,
                                 bf16=self.bf16, max_windows=max_windows)
        if count == 0:  # scorable() refuses such a split at start-up; a score of 0 from nothing is never reported
            raise RuntimeError(f"the {split} split gave no character to score")
        return bits / count, count

    def periodic_eval(self) -> None:
        t0 = time.perf_counter()
        bpc, count = self.evaluate("valid", self.cfg.train.eval_max_windows)
        self.metrics.log(self.step, {"valid_bpc": bpc, "valid_chars": count, "eval_s": time.perf_counter() - t0})
        self.log_sample()

    def log_sample(self) -> None:
        """A short generated text (rank 0, its own generator: the training RNG is untouched)."""
        if self.env.is_main and self.cfg.train.sample_chars:
            text = sample_text(self.model, self.vocab, SAMPLE_PROMPT, self.cfg.train.sample_chars,
                               seed=sample_seed(self.cfg.run.seed, self.step))
            self.metrics.log_text(self.step, "sample", SAMPLE_PROMPT + text)

    def train_step(self, preempt_flag: float) -> tuple[float, float, bool, list[float]]:
        """One window on every rank. Returns (mean loss, pre-clip grad norm, preempt agreed, [data, fwd+bwd, opt] seconds)."""
        t = self.cfg.train
        t0 = time.perf_counter()
        batch = self.stream.next()
        x = batch.x.to(self.device, non_blocking=True)
        y = batch.y.to(self.device, non_blocking=True)
        if batch.reset or self.state is None:
            self.state = self.model.init_state(x.shape[0], device=self.device)
        t1 = time.perf_counter()
        with autocast(self.device, self.bf16):
            logits, new_state = self.ddp(x, self.state)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        if faults.armed("nonfinite", self.step + 1):
            loss = loss * float("nan")
        loss.backward()
        self._sync()
        t2 = time.perf_counter()
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm if t.clip_norm > 0 else math.inf))
        mean_loss, any_bad, stop = agree(loss, preempt_flag, self.env.world)
        self.step += 1
        if any_bad or not math.isfinite(norm) or (self.max_loss and mean_loss > self.max_loss):
            self._skip_step(mean_loss, norm)
        else:
            set_lr(self.optimizer, self.schedule.lr(self.step))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite.ok()
            self.state = (new_state[0].detach(), new_state[1].detach())
        self._sync()
        t3 = time.perf_counter()
        return mean_loss, norm, stop, [t1 - t0, t2 - t1, t3 - t2]

    def _skip_step(self, loss: float, norm: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.state = None  # a non-finite forward poisons the carried state: every rank restarts from zeros
        self.say(self.nonfinite.skipped(self.step, loss, norm, self.max_loss))
        if self.nonfinite.exhausted:
            raise NonFiniteStop(self._failed_steps_advice())

    def _failed_steps_advice(self) -> str:
        """The stop line for too many failed steps in a row. The checkpoint written just before the
        first of them holds the weights that failed: rank 0 sets it (and any later one) aside, so the
        advice, and checkpoint.resume=auto, name a checkpoint written before the trouble began."""
        t, first = self.cfg.train, self.nonfinite.first
        head = (f"{self.nonfinite.run} failed steps in a row from step {first} (non-finite or diverged loss; "
                f"train.max_nonfinite={t.max_nonfinite}); lower train.lr or train.clip_norm and run again: ")
        if not self.env.is_main:
            return head  # only rank 0 prints the line, and only it touches the checkpoints
        healthy, moved = ckpt.set_aside_from(self.run_dir, first - 1)
        aside = (f" ({', '.join(p.name for p in moved)}, written from the weights that failed, set aside)"
                 if moved else "")
        if healthy is None:
            return head + f"no checkpoint from before the failures is left, so the run starts afresh{aside}"
        return head + f"it resumes from {healthy}, the last checkpoint written before the failures began{aside}"

    def run(self, preemption: Preemption) -> int:
        cfg, t = self.cfg, self.cfg.train
        self.say(describe(self, placement()))  # placement() is a collective: every rank takes part
        anchor = self.schedule.anchor
        self.say(f"learning rate: {lr_rule.explain(cfg, self.env.world)}, {schedule_phrase(t)}"
                 + (f"; continued from step {anchor[0]} at {anchor[1]:.4g} of the peak (train.resume_schedule)"
                    if anchor else ""))
        window = LogInterval(self.env.world * t.batch_size * t.bptt)
        every = lambda n: n and self.step % n == 0 and self.step < t.steps  # noqa: E731  (not at the end)
        while self.step < t.steps:
            window.begin()
            loss, norm, stop, phases = self.train_step(1.0 if preemption.requested else 0.0)
            faults.after_step(self.step)
            window.add(loss, phases)
            if self.step % cfg.log.every == 0 or self.step == t.steps:
                self._log(window, norm)
            window.end()
            if stop:
                self.say(f"stop requested ({signal.Signals(preemption.signal).name if preemption.requested else 'on another rank'}):"
                         f" checkpointing at step {self.step} and exiting with {EXIT_PREEMPTED}; "
                         "run the same command to resume")
                self.save_checkpoint()
                return EXIT_PREEMPTED
            if every(t.eval_every):
                self.periodic_eval()
            # No periodic checkpoint inside a run of non-finite steps: the newest ones stay healthy ones.
            if every(cfg.checkpoint.every) and self.nonfinite.run == 0:
                self.save_checkpoint()
        return self.finish()

    def finish(self) -> int:
        if self.saved_at != self.step:  # not a file's existence: a damaged file of that name is no checkpoint
            self.save_checkpoint()
        t0 = time.perf_counter()
        valid_bpc, valid_chars = self.evaluate("valid")
        test_bpc, test_chars = self.evaluate("test")
        final = {"valid_bpc": valid_bpc, "test_bpc": test_bpc, "valid_chars": valid_chars, "test_chars": test_chars,
                 "eval_s": time.perf_counter() - t0}
        self.metrics.log(self.step, final)
        self.metrics.summary(final)
        self.log_sample()
        limit = self.cfg.train.divergence_ratio * math.log2(self.vocab.size)
        worst = max(valid_bpc, test_bpc)
        if not math.isfinite(worst) or (limit and worst > limit):
            raise NonFiniteStop(
                f"the final model scores valid {valid_bpc:.4g}, test {test_bpc:.4g} bits per character, above "
                f"{limit:.4g} (train.divergence_ratio × log2 {self.vocab.size}, the score of a uniform guess): it has "
                "diverged; start a new run.name with a lower train.lr, or resume from a checkpoint written before "
                "it diverged (checkpoint.resume=PATH)")
        self.say(f"done: step {self.step}, valid {valid_bpc:.4f} bpc over {valid_chars:,} characters, "
                 f"test {test_bpc:.4f} bpc over {test_chars:,} characters")
        return 0

    def _log(self, window: LogInterval, norm: float) -> None:
        loss, timing = window.take(self.cfg.train.steps - self.step)
        values = {"epoch": self.stream.epoch, "loss": loss, "bpc": loss / LN2, "lr": self.schedule.lr(self.step),
                  "grad_norm": norm, **timing}
        if self.nonfinite.total:
            values["nonfinite_steps"] = self.nonfinite.total
        self.metrics.log(self.step, values)

    def close(self) -> None:
        self.metrics.close()
        self.run_directory.release()


def _report_exit(code: int, together: bool = True) -> bool:
    """Tell a wrapping script how the run ended; True when this process may then exit 0.

    torchrun reports a worker's failure as its own exit status 1, prints a traceback of it, and may
    restart the workers; so the launch scripts and slurm/train.sh pass a file in LSTM_DIST_EXIT_FILE
    and exit with the status written there (local rank 0 of every node writes it, each node's script
    reading its own, or the rank that met an ending alone). An ending every rank reached together (done, a non-finite stop or a preemption
    the ranks agreed on, a mistake in the config that every rank read alike) then exits 0, so that
    torchrun ends quietly and restarts nothing a restart cannot fix. An ending this rank may have
    met alone keeps its status: torchrun must see it to stop the other ranks, which would otherwise
    wait for this one in a collective."""
    path = os.environ.get("LSTM_DIST_EXIT_FILE")
    if not path:
        return False
    if not together or os.environ.get("LOCAL_RANK", "0") == "0":  # an ending of its own: this rank tells it
        try:
            atomic_write_text(Path(path), f"{code}\n")
        except OSError as exc:
            print(f"warning: cannot write the exit status to LSTM_DIST_EXIT_FILE={path}: {exc}", file=sys.stderr)
            return False
    return together


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstm_dist.train", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 done, 2 user error, 3 non-finite stop, 75 preempted.")
    config_mod.add_arguments(parser)
    args = parser.parse_args(argv)
    started = False  # whether this process joined the process group (after that, errors may be its own)
    try:
        cfg = config_mod.load(args.config, args.overrides)
        if args.print_config:
            sys.stdout.write(cfg.to_yaml())
            sys.stdout.write(lr_rule.print_config_note(cfg, int(os.environ.get("WORLD_SIZE", "1"))))
            return 0
        preemption = Preemption()
        preemption.install()
        with setup(cfg.train.device, timeout_minutes=cfg.train.collective_timeout / 60) as env:
            started = True
            trainer = None
            try:
                trainer = Trainer(cfg, env)
                code = trainer.run(preemption)
            except NonFiniteStop as exc:
                if env.is_main:
                    print(f"error: {exc}", file=sys.stderr, flush=True)
                code = EXIT_NONFINITE
            finally:
                if trainer is not None:
                    trainer.close()
                # Free DDP (and any gloo/NCCL work it still holds) while the process group is alive;
                # freed later, at interpreter exit, gloo's threads can abort the process.
                trainer = None
                gc.collect()
                preemption.restore()
    except UserError as exc:
        # Before the process group every rank read the same config; after it, an EveryRankError is every
        # rank's, and any other user error may be this rank's alone: it says so, and keeps its status.
        together = not started or isinstance(exc, EveryRankError)
        print_error(str(exc), every_rank=together)
        return 0 if _report_exit(EXIT_USER_ERROR, together) else EXIT_USER_ERROR
    return 0 if _report_exit(code) else code


if __name__ == "__main__":
    run_cli(main)
