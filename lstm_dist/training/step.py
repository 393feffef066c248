"""The one training step of truncated BPTT: what `train`, `lr_find` and `bench --train` all run.

    forward_backward(x, y, state)  the forward from the carried state under the run's autocast, the
                                   cross-entropy over the window in fp32, backward
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
    """

    def __init__(self, forward: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, clip_norm: float,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 max_loss: float = 0.0, world: int = 1) -> None:
        self.forward, self.model, self.optimizer, self.autocast = forward, model, optimizer, autocast
        self.max_norm = clip_norm if clip_norm > 0 else math.inf  # inf: the norm is measured, nothing clipped
        self.max_loss, self.world = max_loss, world  # max_loss 0: no divergence limit
        self._new_state: Optional[State] = None

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, state: Optional[State],
                         poison: bool = False) -> torch.Tensor:
        """x, y int64 [batch, bptt] (y is x shifted by one character), `state` the carried (h, c) or
        None (zeros) -> the mean loss over the window (nats per character, an fp32 scalar tensor);
        the gradients are in the parameters' `.grad`. `poison` multiplies the loss by NaN before
        backward (LSTM_DIST_FAULT=nonfinite: what a diverged forward gives)."""
        with self.autocast():
            logits, self._new_state = self.forward(x, state)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
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
