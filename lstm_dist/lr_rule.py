"""The learning-rate rule: the peak rate a run uses, from `train.lr` and the run's global batch.

`train.lr` is the peak rate at a reference global batch of `train.lr_ref_batch` streams. A run
with another global batch (world_size × train.batch_size streams) scales it by `train.lr_scaling`:

    sqrt    peak = lr × sqrt(global / lr_ref_batch)      (the default; AdamW's noise-matching rule)
    linear  peak = lr × global / lr_ref_batch
    none    peak = lr, whatever the batch

Nothing is adjusted behind the user's back: `--print-config` shows the rule's inputs and result,
and the line that starts training says which rate the rule gave and why. The evidence behind the
default numbers is the sweep in docs/lr_sweep.md (made by `python -m lstm_dist.lr_sweep`).
"""

from __future__ import annotations

import math

from .config import Config, TrainConfig


def global_batch(t: TrainConfig, world: int) -> int:
    """Streams that one optimizer step averages over: every rank's `batch_size` streams."""
    return world * t.batch_size


def scale_factor(t: TrainConfig, world: int) -> float:
    """How much the rule multiplies `train.lr` by for this world size and batch."""
    ratio = global_batch(t, world) / t.lr_ref_batch
    if t.lr_scaling == "sqrt":
        return math.sqrt(ratio)
    if t.lr_scaling == "linear":
        return ratio
    return 1.0


def peak_lr(t: TrainConfig, world: int) -> float:
    """The peak learning rate of a run (after warm-up, before decay)."""
    return t.lr * scale_factor(t, world)


def explain(t: TrainConfig, world: int) -> str:
    """One phrase for logs: the rate the rule gave and where it came from."""
    peak = peak_lr(t, world)
    g = global_batch(t, world)
    if t.lr_scaling == "none":
        return f"peak lr {peak:.4g} (train.lr, train.lr_scaling=none)"
    op = "sqrt" if t.lr_scaling == "sqrt" else ""
    return (f"peak lr {peak:.4g} = train.lr {t.lr:.4g} × {op}({g} streams / train.lr_ref_batch "
            f"{t.lr_ref_batch}) (train.lr_scaling={t.lr_scaling})")


def print_config_note(cfg: Config, world: int) -> str:
    """YAML comment lines for `--print-config`: the rule's result for this launch's world size."""
    return (f"# learning-rate rule for world_size={world} (WORLD_SIZE, 1 without torchrun): "
            f"{explain(cfg.train, world)}\n")
