"""The one training step of truncated BPTT: what `train`, `lr_find` and `bench --train` all run.

    forward_backward(x, y, state)  the forward from the carried state under the run's autocast, the
                                   cross-entropy over the window in fp32, backward; in `micro_batches`
                                   forward/backward passes over slices of the streams (gradient
                                   accumulation), DDP's all-reduce after the last only
    clip()                         the global gradient norm, clipped to `clip_norm` (0: measured only)
    verdict(loss, norm)            [mean loss over the ranks, norm, failed]: one small all-reduce; a
                                   non-finite loss or norm, or a loss above `max_loss`, fails the step
    apply(lr, failed)              set the rate, the optimizer step (skipped on the device where
                                   `failed` is 1), the gradients zeroed (set to None); the new carried
                                   state, detached (zeros after a failed step) / `discard()`: no step

Nothing here reads a value back to the host: the loss, the norm and the verdict stay tensors on the
device, so on CUDA the host runs ahead of the GPU and queues the next step while this one runs. The
trainer reads the verdicts at its log steps (`training.loop`). It comes in parts so that a caller can
time them; calling the step runs all of it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lstm_dist.common.distributed import all_reduce_sum
from lstm_dist.model.char_lstm import State, detach_state
from lstm_dist.training.optim import set_lr


class TrainingStep:
    """One optimizer step of `model` on a window, in parts (module docstring).

    `forward` is what runs the window: the model itself, or its DistributedDataParallel wrapper
    (whose backward all-reduces the gradients, so the norm and the update are the same on every
    rank). `model` owns the parameters that are clipped. `autocast` makes the context the forward
    runs in (`Kernels.autocast`: bf16 on CUDA where the run computes in bf16; the loss is fp32 always).
    `max_loss` (nats; 0: none) fails a step whose mean loss over the ranks is above it (a diverged
    run); `world` is the number of ranks that `verdict` averages over (it all-reduces when above 1).
    `micro_batches` k > 1 runs a window's streams in k forward/backward passes of batch / k streams
    each (`training.batching`), the gradients accumulated in `.grad` and all-reduced by DDP after the
    last pass only (its `no_sync` on the others).
    """

    def __init__(self, forward: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, clip_norm: float,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 max_loss: float = 0.0, world: int = 1, micro_batches: int = 1) -> None:
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.forward, self.model, self.optimizer, self.autocast = forward, model, optimizer, autocast
        self.max_norm = clip_norm if clip_norm > 0 else math.inf  # inf: the norm is measured, nothing clipped
        self.max_loss, self.world, self.micro_batches = max_loss, world, micro_batches  # max_loss 0: no limit
        self._new_state: Optional[State] = None

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, state: Optional[State],
                         poison: bool = False) -> torch.Tensor:
        """x, y int64 [batch, bptt] (y is x shifted by one character), `state` the carried (h, c), each
        [layers, batch, hidden], or None (zeros) -> the mean loss over the window (nats per character,
        an fp32 scalar tensor, detached); the gradients are in the parameters' `.grad`.

        With `micro_batches` k, streams [j·batch/k, (j+1)·batch/k) go through the model in pass j with
        their own slice of the state; each pass's mean loss is scaled by 1/k before its backward, so the
        accumulated gradient is the gradient of the window's mean loss, as one pass would give (to float
        summation order). Only the last backward is outside DDP's `no_sync`: one all-reduce per window.
        Raises ValueError when k does not divide batch. `poison` multiplies each pass's loss by NaN before
        backward (LSTM_DIST_FAULT=nonfinite: what a diverged forward gives)."""
        k = self.micro_batches
        if k == 1:
            return self._pass(x, y, state, 1.0, poison).detach()
        batch = x.shape[0]
        if batch % k:
            raise ValueError(f"a window of {batch} streams does not split into {k} micro-batches")
        m = batch // k
        no_sync = getattr(self.forward, "no_sync", contextlib.nullcontext)  # DDP's; a plain module has none
        total, states = None, []
        for j in range(k):
            rows = slice(j * m, (j + 1) * m)
            part = None if state is None else tuple(s[:, rows].contiguous() for s in state)
            with no_sync() if j < k - 1 else contextlib.nullcontext():
                loss = self._pass(x[rows], y[rows], part, 1.0 / k, poison).detach()
            states.append(self._new_state)
            total = loss if total is None else total + loss
        self._new_state = tuple(torch.cat(parts, dim=1) for parts in zip(*states))
        return total

    def _pass(self, x: torch.Tensor, y: torch.Tensor, state: Optional[State], scale: float,
              poison: bool) -> torch.Tensor:
        """One forward and backward of `scale` × the mean cross-entropy of x's streams -> that scaled loss;
        the pass's final state in `_new_state`."""
        with self.autocast():
            logits, self._new_state = self.forward(x, state)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        if scale != 1.0:
            loss = loss * scale
        if poison:
            loss = loss * float("nan")
        loss.backward()
        return loss

    def clip(self) -> torch.Tensor:
        """The global gradient norm before clipping (a 0-d tensor; non-finite when a gradient is)."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)

    def verdict(self, loss: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """On the device, no host read: float64 [3] = (the mean loss over the ranks, the gradient norm,
        1.0 where the step failed on any rank else 0.0). Failed: a non-finite loss on any rank (one
        all-reduce of [loss, non-finite] over the ranks, stream-ordered on NCCL), a non-finite norm (the
        same on every rank: the gradients are already all-reduced), or a mean loss above `max_loss`."""
        loss = loss.detach().to(torch.float64).reshape(1)
        shared = all_reduce_sum(torch.cat([loss, (~torch.isfinite(loss)).to(torch.float64)]))
        mean = shared[0] / self.world
        failed = (shared[1] > 0) | ~torch.isfinite(norm)
        if self.max_loss:
            failed = failed | (mean > self.max_loss)
        return torch.stack([mean, norm.detach().to(torch.float64), failed.to(torch.float64)])

    def apply(self, lr: float, failed: Optional[torch.Tensor] = None) -> State:
        """The optimizer step at rate `lr`, then the gradients zeroed; returns the window's final
        (h, c), detached: the next window starts from it without backpropagating into this one.
        `failed`, a 0-d tensor on the device (1: failed, `verdict()[2]`), skips the step on the device:
        the fused optimizer's `found_inf` leaves the weights, moments and step count as they were, and
        the returned state is zeros (a non-finite forward poisons the carried state)."""
        set_lr(self.optimizer, lr)
        flag = None if failed is None else failed.to(torch.float32)
        self.optimizer.found_inf = flag  # read by torch's fused AdamW and SGD: skip where 1
        try:
            self.optimizer.step()
        finally:
            self.optimizer.found_inf = None
        self.optimizer.zero_grad(set_to_none=True)
        state, self._new_state = detach_state(self._new_state), None
        if flag is not None and state is not None:
            state = tuple(torch.where(flag > 0, torch.zeros_like(s), s) for s in state)
        return state

    def discard(self) -> None:
        """No optimizer step: the gradients zeroed, the window's state dropped."""
        self.optimizer.zero_grad(set_to_none=True)
        self._new_state = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, state: Optional[State],
                 lr: float) -> Tuple[torch.Tensor, State]:
        """All of it, as training runs it: (the verdict, float64 [3] on the device, and the next
        window's state). Nothing waits for the device here."""
        loss = self.forward_backward(x, y, state)
        record = self.verdict(loss, self.clip())
        return record, self.apply(lr, record[2])
