"""When a run stops, and how every rank agrees on it: the stop signal (SIGTERM/SIGUSR1 only set a
flag), failed steps (a non-finite loss or gradient, or a diverged loss: skipped on every rank; too
many in a row stop the run, with the advice of `failed_steps_advice`), the all-reduce that agrees on
a stop at the steps the trainer settles at (`agree_flags`), and the exit status of each ending."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import torch

from lstm_dist.common.distributed import all_reduce_sum
from lstm_dist.training.checkpoint import set_aside_from

EXIT_NONFINITE = 3  # too many failed steps in a row, or a diverged final score
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; slurm/train.sh requeues on it


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
    """Too many failed steps in a row, or a diverged final score: the run ends with exit status 3."""


class NonFinite:
    """Failed steps, skipped on every rank: a non-finite loss or gradient, or a diverged loss (above
    `train.divergence_ratio` × the loss of a uniform guess). Counted in all (kept in checkpoints) and
    in a row; `first` is the first step of the current row."""

    def __init__(self, limit: int, total: int = 0) -> None:
        self.limit, self.total, self.run, self.first = limit, total, 0, 0

    def ok(self) -> None:
        self.run = 0

    def skipped(self, step: int, loss: float, norm: float, max_loss: float = 0.0) -> str:
        """Count a failed step; returns the warning to print. `max_loss` (nats) is the divergence limit."""
        self.total += 1
        self.run += 1
        if self.run == 1:
            self.first = step
        if math.isfinite(loss) and math.isfinite(norm):
            what = (f"diverged loss {loss:.4g} (above {max_loss:.4g}, train.divergence_ratio × the loss of a "
                    "uniform guess)")
        else:
            what = f"non-finite loss or gradient (loss {loss:.4g}, grad norm {norm:.4g})"
        return (f"warning: step {step}: {what}; optimizer step skipped on every rank "
                f"({self.run} in a row, {self.total} in all)")

    @property
    def exhausted(self) -> bool:
        """Whether `limit` failed steps came in a row: the run must stop."""
        return self.run >= self.limit

    def state_dict(self) -> int:
        """The checkpoint piece `nonfinite_total`: failed steps in all (a run of them is never saved)."""
        return self.total

    def load_state_dict(self, total: int | None) -> None:
        """`total` from a checkpoint; None (a file written before it was kept) counts from 0."""
        self.total = int(total or 0)


def failed_steps_advice(nonfinite: NonFinite, run_dir: Path, is_main: bool) -> str:
    """The stop line for too many failed steps in a row. The checkpoint written just before the
    first of them holds the weights that failed: rank 0 (`is_main`) sets it (and any later one)
    aside, so the advice, and checkpoint.resume=auto, name a checkpoint written before the trouble
    began. Other ranks only get the line's head: only rank 0 prints it and touches checkpoints."""
    head = (f"{nonfinite.run} failed steps in a row from step {nonfinite.first} (non-finite or diverged loss; "
            f"train.max_nonfinite={nonfinite.limit}); lower train.lr or train.clip_norm and run again: ")
    if not is_main:
        return head
    healthy, moved = set_aside_from(run_dir, nonfinite.first - 1)
    aside = (f" ({', '.join(p.name for p in moved)}, written from the weights that failed, set aside)"
             if moved else "")
    if healthy is None:
        return head + f"no checkpoint from before the failures is left, so the run starts afresh{aside}"
    return head + f"it resumes from {healthy}, the last checkpoint written before the failures began{aside}"


def agree_flags(flags: list[bool], device: torch.device) -> list[bool]:
    """Whether any rank raised each flag (the stop signal, a failed compiled step): one all-reduce of
    this rank's flags, read back (a host synchronisation: called only at the steps the trainer settles
    at, the same on every rank)."""
    mine = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float64, device=device)
    return [total > 0 for total in all_reduce_sum(mine).tolist()]
