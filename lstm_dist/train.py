"""Train the character LSTM: `python -m lstm_dist.train --config FILE [section.key=value ...]`.

One machine, all its GPUs (or 2 CPU processes for the smoke run):

    torchrun --standalone --nproc_per_node=2 -m lstm_dist.train --config configs/smoke.yaml
    torchrun --standalone --nproc_per_node=gpu -m lstm_dist.train --config configs/wikitext103.yaml

Several machines started by hand (the same command on each, NODE_RANK 0..N-1):

    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_ADDR:29500 -m lstm_dist.train --config configs/wikitext103.yaml

A plain `python -m lstm_dist.train ...` is a world of one.

Each rank reads its own streams of the training split (`data.TokenStream`), carries every stream's
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
import collections
import contextlib
import gc
import math
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .atomic import atomic_write_text
from . import config as config_mod
from . import data as data_mod
from . import lr_rule
from .config import Config
from .distributed import DistEnv, all_reduce_sum, barrier, broadcast_object, gather_objects, setup
from .errors import UserError, run_cli
from .metrics import Metrics
from .model import CharLSTM
from .sampling import sample_text
from .scoring import LN2, split_bits

EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; slurm/train.sh requeues on it
SAMPLE_PROMPT = "The "


class Preemption:
    """SIGTERM/SIGUSR1 set a flag and do nothing else; the loop acts on it at a step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteStop(Exception):
    pass


def lr_at(step: int, t: config_mod.TrainConfig, peak: float | None = None) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up, then the decay to peak·min_lr_ratio.
    `peak` is the rate lr_rule gives the run (default: t.lr as written)."""
    top = t.lr if peak is None else peak
    if t.warmup_steps and step <= t.warmup_steps:
        return top * step / t.warmup_steps
    if t.schedule == "constant":
        return top
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    low = top * t.min_lr_ratio
    if t.schedule == "linear":
        return top - (top - low) * progress
    return low + 0.5 * (top - low) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, t: config_mod.TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on the matrices of the LSTM and the head; not on biases, nor on the embedding
    # (a table lookup, decaying it only shrinks rare characters' rows).
    embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embedding_params else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.beta1)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_corpus(cfg: Config, env: DistEnv, say) -> data_mod.Corpus:
    """The prepared corpus; a built-in source's default location is prepared by rank 0 on first use."""
    path = Path(cfg.data.path)
    if not path.exists():
        source = data_mod.builtin_source_for(path)
        if source is None:
            raise UserError(f"data.path {path} does not exist; prepare a corpus there first "
                            f"(python -m lstm_dist.data prepare --source ... --out {path}) or point data.path at one")
        if env.is_main:
            say(f"data.path {path} does not exist: preparing the built-in '{source}' corpus there "
                f"({cfg.data.vocab} vocabulary); the other ranks wait")
            data_mod.prepare(source, path, vocab=cfg.data.vocab)
        barrier()
    return data_mod.Corpus(path)


def check_compatible(saved: dict[str, Any], cfg: Config, vocab: data_mod.Vocab, path: Path) -> None:
    """A checkpoint must be of the same model on the same vocabulary; say which setting differs."""
    saved_model = saved["config"]["model"]
    for key in ("embedding", "hidden", "layers"):
        if saved_model[key] != getattr(cfg.model, key):
            raise ckpt.CheckpointError(
                f"checkpoint {path} is of another model (model.{key}={saved_model[key]}, this run has "
                f"{getattr(cfg.model, key)}); set model.{key}={saved_model[key]} or start a new run.name")
    if saved["vocab"] != vocab.to_dict():
        raise ckpt.CheckpointError(
            f"checkpoint {path} was trained on another vocabulary than the corpus at {cfg.data.path}; "
            "use the corpus it was trained on or start a new run.name")


def find_resume(cfg: Config, vocab: data_mod.Vocab, say) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from (rank 0 decides; every rank then loads the same file)."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None
    if mode != "auto":
        path = ckpt.resolve(mode)
        saved = ckpt.load(path)
        check_compatible(saved, cfg, vocab, path)
        return path, saved
    for path in ckpt.candidates(cfg.run_dir):
        try:
            saved = ckpt.load(path)
            check_compatible(saved, cfg, vocab, path)
            return path, saved
        except ckpt.CheckpointError as exc:
            say(f"warning: {exc}; falling back to the previous checkpoint")
    return None


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.device = env.device
        t = cfg.train
        self.bf16 = self.device.type == "cuda" and t.precision in ("auto", "bf16")
        if t.precision == "bf16" and self.device.type != "cuda":
            self.say("note: train.precision=bf16 applies on CUDA only; this CPU run computes in fp32")
        threads = t.threads or max(1, len(os.sched_getaffinity(0)) // env.local_world)
        if self.device.type == "cpu":
            torch.set_num_threads(threads)

        self.run_dir = cfg.run_dir
        self.corpus = open_corpus(cfg, env, self.say)
        self.vocab = self.corpus.vocab
        self.splits = {name: self.corpus.split(name) for name in ("train", "valid", "test")}
        self.stream = data_mod.TokenStream(self.splits["train"], env.rank, env.world, t.batch_size, t.bptt,
                                           seed=cfg.run.seed, random_offset=cfg.data.random_offset)

        seed_everything(cfg.run.seed)  # the same initial weights on every rank
        self.model = CharLSTM.from_config(cfg.model, self.vocab.size).to(self.device)
        self.optimizer = build_optimizer(self.model, t)
        self.peak_lr = lr_rule.peak_lr(cfg, env.world)  # the documented rule: train.lr scaled to this run's batch, width, depth
        self.step = 0
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        resumed = self._resume()
        if not resumed:
            seed_everything(cfg.run.seed + 1000 * env.rank + 1)  # per-rank stream (dropout)
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
                    if env.distributed else self.model)
        self.metrics = None
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
            w = cfg.log.wandb
            self.metrics = Metrics(self.run_dir, cfg.to_dict(), wandb_mode=w.mode, project=w.project,
                                   entity=w.entity or None, run_name=cfg.run.name, init_timeout=w.init_timeout)
            if resumed:
                self.metrics.truncate_after(self.step)
        barrier()

    # ---------------------------------------------------------------- helpers

    def say(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)

    def _amp(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------- checkpoints

    def _resume(self) -> bool:
        found = None
        if self.env.is_main:
            found = find_resume(self.cfg, self.vocab, self.say)
        path = broadcast_object(str(found[0]) if found else None)
        if path is None:
            if self.cfg.checkpoint.resume == "auto":
                self.say(f"no checkpoint in {ckpt.checkpoint_dir(self.run_dir)}: starting fresh")
            return False
        saved = found[1] if found else ckpt.load(path)
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model: {first}; "
                                       "use the config it was written with") from None
        self.step = int(saved["step"])
        self.nonfinite_total = int(saved.get("nonfinite_total", 0))
        ranks = saved["ranks"]
        t = self.cfg.train
        same_layout = len(ranks) == self.env.world and ranks[0]["stream"]["batch"] == t.batch_size \
            and ranks[0]["stream"]["bptt"] == t.bptt
        # An exact restore needs the same layout; the stream also re-cuts when the split changed length.
        if same_layout and not self.stream.load_state_dict(ranks[self.env.rank]["stream"]):
            mine = ranks[self.env.rank]
            hidden = mine["hidden"]
            self.state = None if hidden is None else (hidden[0].to(self.device), hidden[1].to(self.device))
            set_rng_state(mine["rng"], self.device)
            self.say(f"resumed from {path} at step {self.step}")
        else:
            self.stream.load_state_dict(ranks[0]["stream"])
            self.state = None
            seed_everything(self.cfg.run.seed + 1000 * self.env.rank + 1 + 7919 * self.step)
            old = ranks[0]["stream"]
            self.say(f"resumed from {path} at step {self.step}: it was written by {len(ranks)} processes × batch "
                     f"{old['batch']} × bptt {old['bptt']}; re-cut streams for {self.env.world} × "
                     f"{t.batch_size} × {t.bptt}: position carried over by characters consumed, hidden states "
                     "start at zero")
        return True

    def save_checkpoint(self) -> None:
        hidden = None if self.state is None else (self.state[0].detach().cpu(), self.state[1].detach().cpu())
        mine = {"stream": self.stream.state_dict(), "hidden": hidden, "rng": rng_state(self.device)}
        ranks = gather_objects(mine)
        if self.env.is_main:
            t0 = time.perf_counter()
            path = ckpt.save(self.run_dir, self.step, {
                "config": self.cfg.to_dict(),
                "vocab": self.vocab.to_dict(),
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": {"step": self.step, "lr": lr_at(max(self.step, 1), self.cfg.train, self.peak_lr)},
                "nonfinite_total": self.nonfinite_total,
                "world_size": self.env.world,
                "ranks": ranks,
            }, keep=self.cfg.checkpoint.keep)
            self.say(f"checkpoint {path} ({time.perf_counter() - t0:.2f}s)")
        barrier()

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, split: str, max_windows: int = 0) -> tuple[float, int]:
        bits, count = split_bits(self.model, self.splits[split], rank=self.env.rank, world=self.env.world,
                                 batch=self.cfg.train.batch_size, bptt=self.cfg.train.bptt, device=self.device,
                                 bf16=self.bf16, max_windows=max_windows)
        return bits / max(count, 1), count

    def periodic_eval(self) -> None:
        t0 = time.perf_counter()
        bpc, count = self.evaluate("valid", self.cfg.train.eval_max_windows)
        values = {"valid_bpc": bpc, "valid_chars": count, "eval_s": time.perf_counter() - t0}
        if self.metrics is not None:
            self.metrics.log(self.step, values)
        self.log_sample()

    def log_sample(self) -> None:
        """A short generated text (rank 0, its own generator: the training RNG is untouched)."""
        if self.metrics is not None and self.cfg.train.sample_chars:
            text = sample_text(self.model, self.vocab, SAMPLE_PROMPT, self.cfg.train.sample_chars,
                               seed=self.cfg.run.seed + self.step)
            self.metrics.log_text(self.step, "sample", SAMPLE_PROMPT + text)

    # ---------------------------------------------------------------- the loop

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
        with self._amp():
            logits, new_state = self.ddp(x, self.state)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        self._sync()
        t2 = time.perf_counter()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm if t.clip_norm > 0 else math.inf)
        local_bad = 0.0 if torch.isfinite(loss) else 1.0
        # One small all-reduce per step: the mean loss, whether any rank saw a non-finite loss, and
        # whether any rank was asked to stop. The gradient norm is already the same on every rank.
        agreed = all_reduce_sum(torch.stack([loss.detach().float(), torch.tensor(local_bad, device=self.device),
                                             torch.tensor(preempt_flag, device=self.device)]).to(torch.float64))
        agreed = agreed.tolist()
        norm_value = float(norm)
        bad = agreed[1] > 0 or not math.isfinite(norm_value)
        self.step += 1
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.state = None  # a non-finite forward poisons the carried state: every rank restarts from zeros
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            self.say(f"warning: step {self.step}: non-finite loss or gradient (loss {agreed[0] / self.env.world:.4g}, "
                     f"grad norm {norm_value:.4g}); optimizer step skipped on every rank "
                     f"({self.nonfinite_run} in a row, {self.nonfinite_total} in all)")
            if self.nonfinite_run >= t.max_nonfinite:
                raise NonFiniteStop(f"{self.nonfinite_run} consecutive non-finite steps (train.max_nonfinite="
                                    f"{t.max_nonfinite}); lower train.lr or train.clip_norm and resume from the last "
                                    "checkpoint, which is untouched")
        else:
            lr = lr_at(self.step, t, self.peak_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_run = 0
            self.state = (new_state[0].detach(), new_state[1].detach())
        self._sync()
        t3 = time.perf_counter()
        return agreed[0] / self.env.world, norm_value, agreed[2] > 0, [t1 - t0, t2 - t1, t3 - t2]

    def run(self, preemption: Preemption) -> int:
        cfg, t = self.cfg, self.cfg.train
        chars_per_step = self.env.world * t.batch_size * t.bptt
        self.say(f"training {sum(p.numel() for p in self.model.parameters()):,} parameters on {self.env.world} "
                 f"process(es) × {t.batch_size} streams × bptt {t.bptt} ({self.device.type}, "
                 f"{'bf16' if self.bf16 else 'fp32'}, {torch.get_num_threads()} threads/process); "
                 f"steps {self.step + 1}..{t.steps}; run directory {self.run_dir}")
        self.say(f"learning rate: {lr_rule.explain(cfg, self.env.world)}, warm-up {t.warmup_steps} steps, "
                 f"{t.schedule} decay to {t.min_lr_ratio:g} of it")
        window = {"loss": 0.0, "n": 0, "times": [0.0, 0.0, 0.0], "wall": 0.0, "steps": 0}
        step_times: collections.deque[float] = collections.deque(maxlen=50)  # for the time-left estimate
        while self.step < t.steps:
            w0 = time.perf_counter()
            loss, norm, stop, times = self.train_step(1.0 if preemption.requested else 0.0)
            if math.isfinite(loss):
                window["loss"] += loss
                window["n"] += 1
            for i in range(3):
                window["times"][i] += times[i]
            window["steps"] += 1
            if self.step % cfg.log.every == 0 or self.step == t.steps:
                before_log = time.perf_counter()
                window["wall"] += before_log - w0
                self._log(window, norm, chars_per_step, step_times)
                # Logging is time outside forward+backward too: the next window pays for this line.
                window["wall"] += time.perf_counter() - before_log
            else:
                window["wall"] += time.perf_counter() - w0
            step_times.append(time.perf_counter() - w0)
            if stop:
                self.say(f"stop requested (signal {preemption.signal if preemption.requested else 'on another rank'}):"
                         f" checkpointing at step {self.step} and exiting with {EXIT_PREEMPTED}; "
                         "run the same command to resume")
                self.save_checkpoint()
                return EXIT_PREEMPTED
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                self.periodic_eval()
            # No periodic checkpoint inside a run of non-finite steps: the newest ones stay healthy ones.
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < t.steps \
                    and self.nonfinite_run == 0:
                self.save_checkpoint()
        if not (ckpt.checkpoint_dir(self.run_dir) / ckpt.file_name(self.step)).exists():
            self.save_checkpoint()
        t0 = time.perf_counter()
        valid_bpc, valid_chars = self.evaluate("valid")
        test_bpc, test_chars = self.evaluate("test")
        final = {"valid_bpc": valid_bpc, "test_bpc": test_bpc, "valid_chars": valid_chars, "test_chars": test_chars,
                 "eval_s": time.perf_counter() - t0}
        if self.metrics is not None:
            self.metrics.log(self.step, final)
            self.metrics.summary(final)
        self.log_sample()
        self.say(f"done: step {self.step}, valid {valid_bpc:.4f} bpc over {valid_chars:,} characters, "
                 f"test {test_bpc:.4f} bpc over {test_chars:,} characters")
        return 0

    def _log(self, window: dict[str, Any], norm: float, chars_per_step: int, step_times: collections.deque) -> None:
        steps = max(1, window["steps"])
        data_s, fb_s, opt_s = window["times"]
        wall = max(window["wall"], data_s + fb_s + opt_s)
        loss = window["loss"] / window["n"] if window["n"] else float("nan")
        recent = list(step_times) or [wall / steps]
        values = {
            "epoch": self.stream.state_dict()["epoch"],
            "loss": loss,
            "bpc": loss / LN2,
            "lr": lr_at(self.step, self.cfg.train, self.peak_lr),
            "grad_norm": norm,
            "chars_per_s": chars_per_step * steps / wall if wall > 0 else 0.0,
            "data_ms": 1000 * data_s / steps,
            "fwd_bwd_ms": 1000 * fb_s / steps,
            "opt_ms": 1000 * opt_s / steps,
            "outside_fwd_bwd_pct": 100.0 * (1.0 - fb_s / wall) if wall > 0 else 0.0,
            # the median of recent steps: the first step's compilation must not inflate the estimate
            "eta_s": (self.cfg.train.steps - self.step) * statistics.median(recent),
        }
        if self.nonfinite_total:
            values["nonfinite_steps"] = self.nonfinite_total
        if self.metrics is not None:
            self.metrics.log(self.step, values)
        window.update(loss=0.0, n=0, times=[0.0, 0.0, 0.0], wall=0.0, steps=0)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def _report_exit(env: DistEnv | None, code: int) -> None:
    """Tell a wrapping script how the run ended. torchrun reports a worker's failure as its own exit
    status 1 (and dies of the SIGTERM it forwards), so launch/torchrun.sh and slurm/train.sh pass a
    file in LSTM_DIST_EXIT_FILE and exit with the status rank 0 wrote there."""
    path = os.environ.get("LSTM_DIST_EXIT_FILE")
    if path and (env is None or env.is_main):
        try:
            atomic_write_text(Path(path), f"{code}\n")
        except OSError as exc:
            print(f"warning: cannot write the exit status to LSTM_DIST_EXIT_FILE={path}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstm_dist.train", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 done, 2 user error, 3 non-finite stop, 75 preempted.")
    config_mod.add_arguments(parser)
    args = parser.parse_args(argv)
    env: DistEnv | None = None
    try:
        cfg = config_mod.load(args.config, args.overrides)
        if args.print_config:
            sys.stdout.write(cfg.to_yaml())
            sys.stdout.write(lr_rule.print_config_note(cfg, int(os.environ.get("WORLD_SIZE", "1"))))
            return 0
        preemption = Preemption()
        preemption.install()
        with setup(cfg.train.device) as env:
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
    except UserError:
        _report_exit(env, 2)
        raise
    _report_exit(env, code)
    return code


if __name__ == "__main__":
    run_cli(main)
