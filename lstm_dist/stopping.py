"""When a run stops, and how every rank agrees on it: the stop signal (SIGTERM/SIGUSR1 only set a
flag), non-finite steps (skipped on every rank; too many in a row stop the run), and the one small
all-reduce per step that shares both, with the mean loss, among the ranks."""

from __future__ import annotations

import signal
from typing import Any

import torch

from .distributed import all_reduce_sum


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


class NonFinite:
    """Steps skipped for a non-finite loss or gradient: in all (kept in checkpoints) and in a row."""

    def __init__(self, limit: int, total: int = 0) -> None:
        self.limit, self.total, self.run = limit, total, 0

    def ok(self) -> None:
        self.run = 0

    def skipped(self, step: int, loss: float, norm: float) -> str:
        """Count a skipped step; returns the warning to print."""
        self.total += 1
        self.run += 1
        return (f"warning: step {step}: non-finite loss or gradient (loss {loss:.4g}, grad norm {norm:.4g}); "
                f"optimizer step skipped on every rank ({self.run} in a row, {self.total} in all)")

    def check(self) -> None:
        if self.run >= self.limit:
            raise NonFiniteStop(f"{self.run} consecutive non-finite steps (train.max_nonfinite={self.limit}); "
                                "lower train.lr or train.clip_norm and resume from the last checkpoint, which is untouched")


def agree(loss: torch.Tensor, preempt_flag: float, world: int) -> tuple[float, bool, bool]:
    """One small all-reduce per step: (the mean loss over ranks, whether any rank saw a non-finite
    loss, whether any rank was asked to stop). The gradient norm is already the same on every rank."""
    bad = 0.0 if torch.isfinite(loss) else 1.0
    flags = torch.tensor([bad, preempt_flag], device=loss.device)
    total = all_reduce_sum(torch.cat([loss.detach().float().reshape(1), flags]).to(torch.float64)).tolist()
    return total[0] / world, total[1] > 0, total[2] > 0
