"""Bits over a whole split: every predictable token once, with the text before it, summed across ranks.

Shared by the training loop's evaluations and `python -m lstm_dist.evaluate`. The split is cut by
`streams.eval_batches` into world × batch contiguous segments with the hidden state carried inside
each; every segment but the first starts `context` tokens early (one window, `bptt`, unless told)
and reads them unscored, so its first scored token is predicted from the text before it, as in one
long stream, and the score barely depends on how many streams or processes there are
(docs/scoring.md measures it). The masked tail of the last window is scored too, so the total
covers the split exactly: n - 1 tokens of a split of n, each once.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from lstm_dist.data.streams import eval_batches
from lstm_dist.common.distributed import all_reduce_sum

LN2 = math.log(2.0)


@torch.no_grad()
def split_bits(model: torch.nn.Module, data: np.ndarray, *, rank: int, world: int, batch: int, bptt: int,
               device: torch.device, bf16: bool = False, max_windows: int = 0,
               context: int | None = None) -> tuple[float, int]:
    """(total bits, tokens scored) of `data` (a 1-D array of token ids, n of them) over all ranks:
    -log2 p of tokens 1..n-1, each once (all n - 1 of them unless `max_windows`), this rank reading
    its `batch` of the world × batch segments `bptt` tokens a window. Every segment but the first
    first reads the `context` tokens before it (default `bptt`) without scoring them. `max_windows`
    > 0 scores only the first max_windows × bptt tokens of each segment, after its context (a
    cheaper estimate). Every rank must call it (the sums are all-reduced); `bf16` autocasts on
    CUDA. Raises ValueError on a bad layout or a negative `context`."""
    was_training = model.training
    model.eval()
    bits = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else contextlib.nullcontext()
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
    finally:
        model.train(was_training)
    totals = all_reduce_sum(torch.stack([bits, count]))
    return float(totals[0]), int(round(float(totals[1])))
