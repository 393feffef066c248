"""Faults on purpose, for the tests: `LSTM_DIST_FAULT=POINT[:step=S][:rank=R]` makes one named point fail.

The fault-tolerance tests need a process to die, or a rank to go wrong, at an exact place that no
outside timing can hit reliably: between a checkpoint's write and its rename, at step 12 on rank 1.
Each point below is one line in the code it concerns; unset (always, outside the tests) it costs one
cached lookup. A fault fires in the first attempt only (TORCHELASTIC_RESTART_COUNT unset or 0),
so that workers restarted by torchrun run clean.

    kill                      SIGKILL this process after optimizer step S
    raise                     raise a RuntimeError after step S (a crash on one rank)
    user-error                raise a UserError after step S (a mistake that rank met alone)
    preempt                   send this process SIGUSR1 after step S (a signal on one rank only); as
                              with a real signal, the ranks agree on it at the next step the trainer
                              settles at (with log.every=1, S+1: `preempt:step=15` checkpoints at 16)
    hang                      sleep for an hour after step S (a rank that stops answering)
    nonfinite                 make the loss of step S non-finite
    checkpoint-before-rename  SIGKILL once the checkpoint of step S is written, before it is renamed
    checkpoint-before-latest  SIGKILL once the checkpoint of step S is in place, before `latest` names it
    compile-fails             this rank reports that torch.compile of the LSTM step failed (at start-up)
    compile-fails-later       this rank records a compiled LSTM step that raised in step S (mid-run)
    triton-fails              this rank reports that the Triton LSTM step cannot run (at start-up)
    graphs-fail               this rank reports that CUDA graphs of the LSTM loops cannot run (at start-up, CUDA)
    graphs-fail-later         this rank records a CUDA graph capture that failed in step S (mid-run)
    cpu-loops-fail            this rank reports that the C++ LSTM loops could not be built (at start-up)
"""

from __future__ import annotations

import functools
import os
import signal
import time

from lstm_dist.common.errors import UserError

POINTS = ("kill", "raise", "user-error", "preempt", "hang", "nonfinite", "checkpoint-before-rename",
          "checkpoint-before-latest", "compile-fails", "compile-fails-later",
          "triton-fails", "graphs-fail", "graphs-fail-later", "cpu-loops-fail")
AFTER_STEP = ("kill", "raise", "user-error", "preempt", "hang")


@functools.cache  # read once per process: `after_step` asks at every step
def _spec() -> dict[str, str] | None:
    raw = os.environ.get("LSTM_DIST_FAULT")
    if not raw or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        return None
    point, *fields = raw.split(":")
    spec = {"point": point}
    for field in fields:
        key, _, value = field.partition("=")
        spec[key] = value
    if point not in POINTS or not set(spec) <= {"point", "step", "rank"}:
        raise UserError(f"LSTM_DIST_FAULT={raw!r} is not POINT[:step=S][:rank=R] with POINT one of {', '.join(POINTS)}")
    return spec


def armed(point: str, step: int) -> bool:
    """Whether the fault `point` fires at `step` in this process."""
    spec = _spec()
    if spec is None or spec["point"] != point:
        return False
    if "step" in spec and int(spec["step"]) != step:
        return False
    return "rank" not in spec or int(spec["rank"]) == int(os.environ.get("RANK", "0"))


def at(point: str, step: int) -> None:
    """Fire the fault `point` here if it is armed for `step` (no-op otherwise)."""
    if not armed(point, step):
        return
    rank = os.environ.get("RANK", "0")
    if point in ("kill", "checkpoint-before-rename", "checkpoint-before-latest"):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "raise":
        raise RuntimeError(f"fault injected on rank {rank} after step {step}")
    if point == "user-error":
        raise UserError(f"fault injected on rank {rank} after step {step} (a mistake one rank met alone)")
    if point == "preempt":
        os.kill(os.getpid(), signal.SIGUSR1)
    if point == "hang":
        time.sleep(3600)


def after_step(step: int) -> None:
    """The faults that fire at the end of an optimizer step."""
    for point in AFTER_STEP:
        at(point, step)
