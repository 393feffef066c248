"""The one training step of truncated BPTT: what `train`, `lr_find` and `bench --train` all run.

    forward_backward(x, y, state)  the forward from the carried state under the run's autocast, the
                                   cross-entropy over the window in fp32, backward
    clip()                         the global gradient norm, clipped to `clip_norm` (0: measured only)
    apply(lr) / discard()          set the rate, the optimizer step, the gradients zeroed (set to
                                   None); the new carried state, detached / nothing

It comes in parts so that a caller can act between them: the trainer times the backward, shares the
loss and the stop flag among the ranks after clipping (`stopping.agree`), and skips a failed step
before the optimizer sees it (`discard`). Calling the step runs all of it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lstm_dist.model.char_lstm import State, detach_state
from lstm_dist.training.optim import set_lr


class TrainingStep:
    """One optimizer step of `model` on a window, in parts (module docstring).

    `forward` is what runs the window: the model itself, or its DistributedDataParallel wrapper
    (whose backward all-reduces the gradients, so the norm and the update are the same on every
    rank). `model` owns the parameters that are clipped. `autocast` makes the context the forward
    runs in (`Kernels.autocast`: bf16 on CUDA where the run computes in bf16; the loss is fp32 always).
    """

    def __init__(self, forward: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, clip_norm: float,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.forward, self.model, self.optimizer, self.autocast = forward, model, optimizer, autocast
        self.max_norm = clip_norm if clip_norm > 0 else math.inf  # inf: the norm is measured, nothing clipped
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

    def apply(self, lr: float) -> State:
        """The optimizer step at rate `lr`, then the gradients zeroed; returns the window's final
        (h, c), detached: the next window starts from it without backpropagating into this one."""
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state, self._new_state = detach_state(self._new_state), None
        return state

    def discard(self) -> None:
        """No optimizer step: the gradients zeroed, the window's state dropped (a failed step)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._new_state = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, state: Optional[State],
                 lr: float) -> Tuple[torch.Tensor, torch.Tensor, State]:
        """All of it: (loss, pre-clip norm, the next window's state). The loss and the norm stay
        tensors, so that nothing waits for the device here."""
        loss = self.forward_backward(x, y, state)
        norm = self.clip()
        return loss, norm, self.apply(lr)
