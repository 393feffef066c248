"""Bits over a whole split: every predictable token once, with the text before it, summed across ranks.

Shared by the training loop's evaluations and `python -m lstm_dist.evaluate`. The split is cut by
`streams.eval_batches` into world × batch contiguous segments with the hidden state carried inside
each; every segment but the first starts `context` tokens early (one window, `bptt`, unless told)
and reads them unscored, so its first scored token is predicted from the text before it, as in one
long stream, and the score barely depends on how many streams or processes there are
(docs/scoring.md measures it). The masked tail of the last window is scored too, so the total
covers the split exactly: n - 1 tokens of a split of n, each once.

A long evaluation (all of WikiText-103's valid or test split takes minutes) can say how far it is:
`split_bits(progress=...)` is called after each window with this rank's tokens scored so far and in
all, counted on the host from the windows it queues (no read from the device), and `ProgressLine`
turns that into a line at most every so many seconds.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from lstm_dist.data.streams import eval_batches, rank_segments
from lstm_dist.common.distributed import all_reduce_sum
from lstm_dist.training.metrics import format_duration

LN2 = math.log(2.0)


def rank_tokens(n: int, rank: int, world: int, batch: int, bptt: int, max_windows: int = 0) -> int:
    """How many tokens rank `rank` scores of a split of `n` tokens: its `batch` of the world × batch
    segments (`streams.eval_segments`), each cut to its first max_windows × bptt where `max_windows` > 0,
    as `streams.eval_batches` reads them (context tokens are read, not scored, so not counted)."""
    lo, hi = rank_segments(n, rank, world, batch, bptt, max_windows)
    return int(np.maximum(hi - lo, 0).sum())


class ProgressLine:
    """`split_bits`' `progress` for a person: through `say`, at most every `every_s` seconds (0: after every
    window; the first line once `every_s` has passed, so a short evaluation prints none), a line such as

        evaluating test: 43% (41,088 of 94,793 bytes), 4.1s elapsed, ETA 5.3s

    `split` names what is scored, `unit` its tokens (`Vocab.units.count`: bytes or chars). The counts are
    this rank's (the tokens scored so far of the ones it scores); with more than one rank the line says
    so (`(8,320 of 35,457 bytes on rank 0 of 2)`): the other ranks score as many tokens (to within one per
    stream) and run alongside. The ETA is the time so far scaled to the tokens left (windows of unscored context at the start make
    it high early). On CUDA the count is of the windows the host has queued, which may run a little
    ahead of the device (the host never waits for it here)."""

    def __init__(self, split: str, unit: str, every_s: float, say: Callable[[str], None], rank: int = 0,
                 world: int = 1) -> None:
        self.split, self.unit, self.every_s, self.say = split, unit, every_s, say
        self.where = "" if world == 1 else f" on rank {rank} of {world}"
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.started
        percent = 100 * done // total if total else 100  # rounded down: 100% only once all are scored
        eta = f", ETA {format_duration(elapsed * (total - done) / done)}" if done else ""
        self.say(f"evaluating {self.split}: {percent}% ({done:,} of {total:,} {self.unit}{self.where}), "
                 f"{format_duration(elapsed)} elapsed{eta}")


@torch.no_grad()
def split_bits(model: torch.nn.Module, data: np.ndarray, *, rank: int, world: int, batch: int, bptt: int,
               device: torch.device, bf16: bool = False, max_windows: int = 0,
               context: int | None = None,
               progress: Optional[Callable[[int, int], None]] = None) -> tuple[float, int]:
    """(total bits, tokens scored) of `data` (a 1-D array of token ids, n of them) over all ranks:
    -log2 p of tokens 1..n-1, each once (all n - 1 of them unless `max_windows`), this rank reading
    its `batch` of the world × batch segments `bptt` tokens a window. Every segment but the first
    first reads the `context` tokens before it (default `bptt`) without scoring them. `max_windows`
    > 0 scores only the first max_windows × bptt tokens of each segment, after its context (a
    cheaper estimate). Every rank must call it (the sums are all-reduced); `bf16` autocasts on
    CUDA. `progress`, where given, is called after each window with (tokens this rank has scored so far,
    tokens it scores in all: `rank_tokens`), counted from the window's mask on the host, so it reads
    nothing back from the device (e.g. `ProgressLine`). Raises ValueError on a bad layout or a negative
    `context`."""
    was_training = model.training
    model.eval()
    bits = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else contextlib.nullcontext()
    total = rank_tokens(len(data), rank, world, batch, bptt, max_windows) if progress is not None else 0
    done = 0
    try:
        for eb in eval_batches(data, rank, world, batch, bptt, max_windows=max_windows,
                               context=bptt if context is None else context):
            x = eb.x.to(device, non_blocking=True)
            y = eb.y.to(device, non_blocking=True)
            mask = eb.mask.to(device, non_blocking=True)
            if state is None or eb.reset:
                state = model.init_state(x.shape[0], device=device)
            with amp:
                logits, state = model(x, state)
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            nll = nll.reshape(y.shape).masked_fill(~mask, 0.0)
            bits += nll.sum(dtype=torch.float64) / LN2
            count += mask.sum(dtype=torch.float64)
            if progress is not None:
                done += int(eb.mask.sum())  # the host's copy of the mask: nothing read from the device
                progress(done, total)
    finally:
        model.train(was_training)
    totals = all_reduce_sum(torch.stack([bits, count]))
    return float(totals[0]), int(round(float(totals[1])))
