"""The training loop's timing window: throughput, where a step's time goes, and the time left."""

from __future__ import annotations

import collections
import math
import statistics
import time


class LogInterval:
    """The steps since the last log line: mean loss, where the time went, and the time-left estimate.

    Time spent logging belongs to the next window (the line is written after this one is measured).
    """

    def __init__(self, chars_per_step: int) -> None:
        self.chars_per_step = chars_per_step
        self.recent: collections.deque[float] = collections.deque(maxlen=50)  # whole steps, for the ETA
        self._reset()

    def _reset(self) -> None:
        self.loss, self.n, self.steps, self.wall = 0.0, 0, 0, 0.0
        self.phases = [0.0, 0.0, 0.0]  # data, forward+backward, optimizer

    def begin(self) -> None:
        self._start = self._mark = time.perf_counter()

    def add(self, loss: float, phases: list[float]) -> None:
        if math.isfinite(loss):
            self.loss += loss
            self.n += 1
        self.phases = [a + b for a, b in zip(self.phases, phases)]
        self.steps += 1

    def end(self) -> None:
        now = time.perf_counter()
        self.wall += now - self._mark
        self.recent.append(now - self._start)

    def take(self, steps_left: int) -> tuple[float, dict[str, float]]:
        """(mean loss, timing values) of the window so far; starts a new window."""
        now = time.perf_counter()
        self.wall += now - self._mark
        self._mark = now
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
