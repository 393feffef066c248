"""What a training run measures besides its loss: bits per token (per byte or per character, after the
vocabulary: `Vocab.units`) on the valid split during training (`train.eval_every`, at most
`train.eval_max_windows` scored windows per segment), on all of valid and test at the end (the same
scoring as `python -m lstm_dist.evaluate`: `inference.scoring.split_bits`, each segment after one
window of context), and a short text sample after each (rank 0, on a generator of its own: the training
generators are untouched, so an exact resume does not depend on when samples were drawn).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from lstm_dist.common.distributed import DistEnv
from lstm_dist.config import Config
from lstm_dist.data.corpus import Vocab
from lstm_dist.inference.sampling import sample_text
from lstm_dist.inference.scoring import ProgressLine, split_bits
from lstm_dist.training.metrics import Metrics, format_duration
from lstm_dist.training.seeds import sample_seed
from lstm_dist.training.stopping import NonFiniteStop

class Evaluation:
    """Scores `model` on this rank's share of a split (every rank takes part: the sums are
    all-reduced) and writes the results to `metrics` (rank 0's; a no-op elsewhere)."""

    def __init__(self, cfg: Config, env: DistEnv, model: torch.nn.Module, vocab: Vocab,
                 splits: dict[str, np.ndarray], bf16: bool, say: Callable[[str], None]) -> None:
        self.cfg, self.env, self.model, self.vocab, self.splits, self.bf16, self.say = (
            cfg, env, model, vocab, splits, bf16, say)

    def score(self, split: str, max_windows: int = 0) -> tuple[float, int]:
        """(bits per token, tokens scored) on `split`, over all ranks; `max_windows` > 0 scores only
        the first max_windows × bptt tokens of each segment (after its context of one window). Rank 0
        says how far it is at most every `log.eval_progress_every` seconds (`scoring.ProgressLine`)."""
        t, env = self.cfg.train, self.env
        progress = (ProgressLine(split, self.vocab.units.count, self.cfg.log.eval_progress_every, self.say,
                                 env.rank, env.world) if env.is_main else None)
        bits, count = split_bits(self.model, self.splits[split], rank=env.rank, world=env.world,
                                 batch=t.batch_size, bptt=t.bptt, device=env.device, bf16=self.bf16,
                                 max_windows=max_windows, context=t.bptt, progress=progress)
        if count == 0:  # scorable() refuses such a split at start-up; a score of 0 from nothing is never reported
            raise RuntimeError(f"the {split} split gave no character to score")
        return bits / count, count

    def periodic(self, step: int, metrics: Metrics) -> None:
        """The valid score during training (`val/<score>`, `val/<count>`, `perf/eval_s`: docs/metrics.md),
        then a sample."""
        t0 = time.perf_counter()
        u = self.vocab.units
        score, count = self.score("valid", self.cfg.train.eval_max_windows)
        spent = time.perf_counter() - t0
        metrics.log(step, {f"val/{u.score}": score, f"val/{u.count}": count, "perf/eval_s": spent},
                    line=f"step {step} | valid {score:.4f} {u.score} over {count:,} {u.token}s | eval {format_duration(spent)}")
        self.sample(step, metrics)

    def sample(self, step: int, metrics: Metrics) -> None:
        """A short generated text after `train.sample_prompt` (rank 0, its own generator)."""
        if self.env.is_main and self.cfg.train.sample_chars:
            prompt = self.cfg.train.sample_prompt
            text = sample_text(self.model, self.vocab, prompt, self.cfg.train.sample_chars,
                               seed=sample_seed(self.cfg.run.seed, step))
            metrics.log_text(step, "sample", prompt + text)

    def final(self, step: int, metrics: Metrics) -> None:
        """All of valid and test (`val/<score>`, `test/<score>`, their counts, `perf/eval_s`), logged as a row
        and as the run's summary, then a sample and the `done:` line.
        Raises NonFiniteStop when a score is not finite or above `train.divergence_ratio` × that of
        a uniform guess: a diverged model never ends a run with exit 0."""
        t0 = time.perf_counter()
        u = self.vocab.units
        valid, valid_count = self.score("valid")
        test, test_count = self.score("test")
        scores = {f"val/{u.score}": valid, f"test/{u.score}": test, f"val/{u.count}": valid_count,
                  f"test/{u.count}": test_count, "perf/eval_s": time.perf_counter() - t0}
        # the numbers go to metrics.jsonl and W&B here and to the console once, in the done line below
        metrics.log(step, scores, console=False)
        metrics.summary(scores, console=False)
        self.sample(step, metrics)
        limit = self.cfg.train.divergence_ratio * math.log2(self.vocab.size)
        worst = max(valid, test)
        if not math.isfinite(worst) or (limit and worst > limit):
            raise NonFiniteStop(
                f"the final model scores valid {valid:.4g}, test {test:.4g} {u.per}, above "
                f"{limit:.4g} (train.divergence_ratio × log2 {self.vocab.size}, the score of a uniform guess): it has "
                "diverged; start a new run.name with a lower train.lr, or resume from a checkpoint written before "
                "it diverged (checkpoint.resume=PATH)")
        self.say(f"done: step {step}, valid {valid:.4f} {u.score} over {valid_count:,} {u.token}s, "
                 f"test {test:.4f} {u.score} over {test_count:,} {u.token}s")
