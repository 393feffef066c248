"""What both benches share: timing one call on a device, and what torch.nn.LSTM computes in."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Optional, TYPE_CHECKING

import torch

from lstm_dist.common.errors import UserError
from lstm_dist.model import graphs, loops

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


def failures() -> tuple[Optional[str], Optional[str]]:
    """What has stopped in this process so far: (why compiling failed, why a CUDA graph capture failed),
    each None where it has not (`loops.compile_failure`, `graphs.failure`); a bench row takes it at its
    start, for `path_ran`."""
    return loops.compile_failure(), graphs.failure()


def path_ran(kernels: "Kernels", before: tuple[Optional[str], Optional[str]]) -> str:
    """What a bench row ran, in words: the kernels' phrase (`Kernels.describe`), or, where the compiled
    steps or the CUDA graphs stopped (`before`: `failures()` when the row began), that the row ran
    without them, or ran both ways and its times mix them."""
    compile_before, graphs_before = before
    compile_now, graphs_now = failures()
    phrase, notes = kernels.describe(), ""
    if kernels.compiles() and compile_now is not None:
        if compile_before is not None:
            phrase = phrase.replace(kernels.spec.phrase, "uncompiled steps")
            notes += f" (compiling failed before this row: {compile_now})"
        else:
            notes += f", then uncompiled (compiling failed during this row: {compile_now}; its times mix both)"
    if kernels.graphs and graphs_now is not None:
        if graphs_before is not None:
            phrase = phrase.replace(" in CUDA graphs", " without CUDA graphs")
            notes += f" (capturing failed before this row: {graphs_now})"
        else:
            notes += f", then without graphs (a capture failed during this row: {graphs_now}; its times mix both)"
    return phrase + notes


def warmup_windows(asked: int, kernels: "Kernels") -> int:
    """Untimed windows before a bench times any: `asked`, and with CUDA graphs enough for every set to
    have captured its loops (`graphs.WARMUP` + 1), so that no timed window captures."""
    return max(asked, graphs.WARMUP + 1) if kernels.graphs else asked


# The paths a bench compares (`--paths`): what each sets of the model's kernel settings. "+graphs" on any
# of them also records its time loops as CUDA graphs (model.cuda_graphs).
PATHS = {"eager": {"compile": False, "triton": False}, "compiled": {"compile": True, "triton": False},
         "triton": {"compile": True, "triton": True}}


def parse_paths(text: str) -> list[str]:
    """`--paths` as given ("compiled,compiled+graphs"): the names, each checked (`path_settings`).
    Raises UserError for an unknown name or an empty list."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        path_settings(name)  # a UserError naming the paths there are
    if not names:
        raise UserError("--paths needs at least one path, e.g. --paths compiled,compiled+graphs")
    return names


def precision_of_dtype(word: str) -> str:
    """`--dtype`'s word, the old name of `--precision` in both benches, as `--precision`'s (`float32` ->
    `fp32`, `bfloat16` -> `bf16`); an argparse type: ArgumentTypeError for another word."""
    words = {"float32": "fp32", "bfloat16": "bf16"}
    if word not in words:
        raise argparse.ArgumentTypeError(f"invalid choice: {word!r} (choose from 'float32', 'bfloat16'; "
                                         "its new name is --precision fp32|bf16)")
    return words[word]


def path_settings(name: str) -> dict:
    """The `ModelConfig` fields (compile, triton, cuda_graphs) of a path named as `--paths` takes it:
    eager, compiled or triton, each optionally followed by +graphs. Raises UserError for another name."""
    base, plus, rest = name.partition("+")
    if base not in PATHS or (plus and rest != "graphs"):
        names = ", ".join(f"{p}, {p}+graphs" for p in PATHS)
        raise UserError(f"--paths: no path named {name!r}; the paths are {names}")
    return {**PATHS[base], "cuda_graphs": bool(plus)}
