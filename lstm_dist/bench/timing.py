"""What both benches share: timing one call on a device, and what torch.nn.LSTM computes in."""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional, TYPE_CHECKING

import torch

from lstm_dist.model import loops

if TYPE_CHECKING:
    from lstm_dist.model.kernels import Kernels


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds `fn()` takes, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def append_jsonl(path: str, record: dict) -> None:
    """Append `record` to the file `path` as one JSON line, flushed and synced at once (a bench stopped
    by a time limit right after keeps it)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def baseline_dtype(dtype: str, device: torch.device, tf32: bool = False) -> str:
    """What torch.nn.LSTM computes in under our --dtype: autocast's cast policy sends `lstm` to fp16
    on CUDA (cuDNN), so a bf16 comparison there is ours in bf16 against cuDNN in fp16; in float32 on
    CUDA with `tf32`, cuDNN's products run in TF32 (as ours do)."""
    if dtype == "bfloat16" and device.type == "cuda":
        return "float16 (cuDNN under autocast)"
    if device.type == "cuda" and tf32:
        return f"{dtype} (TF32 products)"
    return dtype


def path_ran(kernels: "Kernels", failure_before: Optional[str]) -> str:
    """What a bench row ran, in words: the kernels' phrase (`Kernels.describe`), or, where the compiled
    steps stopped (`loops.compile_failure`; `failure_before`: the failure already recorded when the
    row began), that the row ran uncompiled, or ran both and its times mix them."""
    failure = loops.compile_failure()
    if not kernels.compiles() or failure is None:
        return kernels.describe()
    if failure_before is not None:
        return f"{kernels.precision()}, uncompiled steps (compiling failed before this row: {failure})"
    return f"{kernels.describe()}, then uncompiled (compiling failed during this row: {failure}; its times mix both)"
