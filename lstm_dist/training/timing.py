"""The training loop's timing: where each step's time goes (`StepClock`), and the log window's
throughput, phases and time left (`LogInterval`)."""

from __future__ import annotations

import collections
import math
import statistics
import time

import torch


class StepClock:
    """Four marks per step (before the data, after it, after forward and backward, after the optimizer)
    and, read at a log step, each step's three phases in seconds.

    On the CPU every op has finished when the next one is called, so a mark is `time.perf_counter()`.
    On CUDA the host only queues the work and runs ahead of the GPU, so a mark is a CUDA event recorded
    on the current stream, and a phase is the GPU's time between two of them (`Event.elapsed_time`),
    idle time waiting for the host included; the events are read only in `take`, once the caller has
    waited for the device anyway (the log step reads the losses back). Nothing here synchronises.
    """

    MARKS = 4

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._steps: list[list] = []
        self._spare: list = []  # events of steps already read, reused (creating one per mark costs a call)

    def mark(self) -> None:
        """One of the step's marks; the first one of a step starts it."""
        if not self._steps or len(self._steps[-1]) == self.MARKS:
            self._steps.append([])
        if self.cuda:
            event = self._spare.pop() if self._spare else torch.cuda.Event(enable_timing=True)
            event.record()
            self._steps[-1].append(event)
        else:
            self._steps[-1].append(time.perf_counter())

    def take(self) -> list[list[float]]:
        """[data, forward+backward, optimizer] seconds of each step marked since the last take; on CUDA
        waits for the last event (already done where the caller read a result of that step)."""
        steps = [marks for marks in self._steps if len(marks) == self.MARKS]
        self._steps = [marks for marks in self._steps if len(marks) != self.MARKS]
        if not self.cuda:
            return [[b - a for a, b in zip(m, m[1:])] for m in steps]
        if steps:
            steps[-1][-1].synchronize()
        phases = [[a.elapsed_time(b) / 1000.0 for a, b in zip(m, m[1:])] for m in steps]
        for m in steps:
            self._spare.extend(m)
        return phases


class LogInterval:
    """The steps since the last log line: mean loss, where the time went, and the time-left estimate.

    `begin`/`end` bracket the training of each step on the host (the log line's own time, evaluation and
    checkpoints fall outside): their sum is the window's wall time, true on CUDA too because the host
    waits for the device inside the bracket of a log step. `add` takes each step's mean loss and
    phases (`StepClock.take`) when the log step reads them.
    """

    def __init__(self, chars_per_step: int) -> None:
        self.chars_per_step = chars_per_step
        self.recent: collections.deque[float] = collections.deque(maxlen=50)  # whole steps, for the ETA
        self._reset()

    def _reset(self) -> None:
        self.loss, self.n, self.steps, self.wall = 0.0, 0, 0, 0.0
        self.phases = [0.0, 0.0, 0.0]  # data, forward+backward, optimizer

    def begin(self) -> None:
        self._mark = time.perf_counter()

    def end(self) -> None:
        self.wall += time.perf_counter() - self._mark

    def add(self, loss: float, phases: list[float]) -> None:
        if math.isfinite(loss):
            self.loss += loss
            self.n += 1
        self.phases = [a + b for a, b in zip(self.phases, phases)]
        self.recent.append(sum(phases))
        self.steps += 1

    def take(self, steps_left: int) -> tuple[float, dict[str, float]]:
        """(mean loss, timing values) of the window so far; starts a new window. Call between `end`
        and the next `begin`."""
        steps = max(1, self.steps)
        data_s, fb_s, opt_s = self.phases
        wall = max(self.wall, data_s + fb_s + opt_s)
        loss = self.loss / self.n if self.n else float("nan")
        recent = list(self.recent) or [wall / steps]
        timing = {
            "chars_per_s": self.chars_per_step * steps / wall if wall > 0 else 0.0,
            "data_ms": 1000 * data_s / steps,
            "fwd_bwd_ms": 1000 * fb_s / steps,
            "opt_ms": 1000 * opt_s / steps,
            "outside_fwd_bwd_pct": 100.0 * (1.0 - fb_s / wall) if wall > 0 else 0.0,
            # the median of recent steps: the first step's compilation must not inflate the estimate
            "eta_s": steps_left * statistics.median(recent),
        }
        self._reset()
        return loss, timing
