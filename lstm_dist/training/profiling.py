"""`log.profile_steps`: a few training steps traced with torch.profiler on rank 0.

The trace is a Chrome trace JSON (`prof.export_chrome_trace`), the format Perfetto (https://ui.perfetto.dev)
and TensorBoard's profiler plugin (torch-tb-profiler) open, written to the run directory's `profile/`;
the operations that took the most time are printed as torch's table. Only rank 0 profiles; the other
ranks run on (and wait for it at their next collective). Stopping the profiler waits for the device,
which is the one host synchronisation these steps add.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from lstm_dist.config.schema import step_range

TOP_ROWS = 12  # operations in the printed table


class StepProfiler:
    """Profiles steps [first, last] of `log.profile_steps` where `active` (rank 0): call `before(step)`
    ahead of each step's work and `after(step)` once it is queued."""

    def __init__(self, steps: str, run_dir: Path, device: torch.device, active: bool,
                 say: Callable[[str], None]) -> None:
        self.first, self.last = step_range(steps) or (0, 0)
        self.run_dir, self.device, self.say = run_dir, device, say
        self.active = active and self.first > 0
        self._prof: Optional[torch.profiler.profile] = None

    def before(self, step: int) -> None:
        if self.active and step == self.first and self._prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.start()

    def after(self, step: int) -> None:
        if self._prof is None or step != self.last:
            return
        prof, self._prof = self._prof, None
        prof.stop()  # waits for the device
        out = self.run_dir / "profile"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"rank0_steps_{self.first}-{self.last}.pt.trace.json"
        prof.export_chrome_trace(str(path))
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        self.say(f"profile of steps {self.first}-{self.last} on rank 0, the operations by their own time ({key}):")
        self.say(prof.key_averages().table(sort_by=key, row_limit=TOP_ROWS, max_name_column_width=48).rstrip())
        self.say(f"profile trace: {path} (open it in https://ui.perfetto.dev or TensorBoard's profiler plugin)")
