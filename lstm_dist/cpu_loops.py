"""The fast LSTM's time loops compiled for the CPU (`csrc/lstm_loops.cpp`), built on first use.

Per time step the eager loops in `lstm_dist.lstm` make 7 (forward) or 6 (backward) ATen calls for the
cell update, each with Python and dispatch overhead and each too small for a second core; the C++
loops do the step's recurrent product through ATen (MKL's packed GEMM where the eager loops use it,
else addmm) and the whole cell update in one vectorised pass over the rows, with no Python between
steps. Measured on 2 cores with `python -m lstm_dist.bench --train --shape 2,256,64,32` (a whole
training step against the same model on torch.nn.LSTM): 0.937-0.944 with these loops, 1.072-1.095
with the eager ones, three paired runs.

Built with torch's extension builder into its cache (`TORCH_EXTENSIONS_DIR`, by default
~/.cache/torch_extensions): about 30 s once per machine and torch version, a load afterwards. Used
for fp32 on CPUs with AVX2 (where torch itself dispatches to AVX2 or AVX-512). Where it cannot be
built (no C++ compiler, no Python headers) or `LSTM_DIST_CPU_LOOPS=0` is set, `get()` returns None
once with the reason in `failure()`, and the eager loops run: the same numbers to ~5e-7.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from .errors import first_line

SOURCE = Path(__file__).with_name("csrc") / "lstm_loops.cpp"
_lock = threading.Lock()
_module: Optional[ModuleType] = None
_failure: Optional[str] = None
_tried = False


def _capable() -> Optional[str]:
    """None if this machine can run the AVX2 build, else why not."""
    if os.environ.get("LSTM_DIST_CPU_LOOPS", "1") == "0":
        return "LSTM_DIST_CPU_LOOPS=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"this CPU's vector capability is {capability}, the C++ loops need AVX2"
    return None


def get() -> Optional[ModuleType]:
    """The compiled loops, built on the first call in this process; None where they cannot be."""
    global _module, _failure, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        _failure = _capable()
        if _failure is None:
            try:
                from torch.utils.cpp_extension import load

                _module = load(name="lstm_dist_loops", sources=[str(SOURCE)],
                               extra_cflags=["-O3", "-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2",
                                             "-DCPU_CAPABILITY_AVX2"],
                               verbose=False)
            except Exception as exc:  # no compiler, no headers, a failed build: the eager loops run
                why = first_line(exc)
                _failure = f"{type(exc).__name__}: {why[:160]}{'…' if len(why) > 160 else ''}"
        _tried = True
        return _module


def failure() -> Optional[str]:
    """Why `get()` returned None (None before the first call or when it works)."""
    return _failure
