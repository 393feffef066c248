"""Bits per character over a whole split: every predictable character once, summed across ranks.

Shared by the training loop's evaluations and `python -m lstm_dist.evaluate`. The split is cut by
`streams.eval_batches` into world × batch contiguous segments with the hidden state carried inside
each; the masked tail of the last window is scored too, so the total covers the split exactly.
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
               device: torch.device, bf16: bool = False, max_windows: int = 0) -> tuple[float, int]:
    """(total bits, characters scored) over all ranks; `max_windows` > 0 caps each rank's windows."""
    was_training = model.training
    model.eval()
    bits = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else contextlib.nullcontext()
    try:
        for i, eb in enumerate(eval_batches(data, rank, world, batch, bptt)):
            if max_windows and i >= max_windows:
                break
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
