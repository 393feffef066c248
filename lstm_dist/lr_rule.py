"""The learning-rate rule: the peak rate a run uses, from `train.lr` and the run's shape.

`train.lr` is the peak rate of a one-layer LSTM `train.lr_ref_hidden` units wide trained on a
global batch of `train.lr_ref_batch` streams. With `train.lr_scaling=sqrt` (the default) a run of
another shape gets

    peak = lr × sqrt(global / lr_ref_batch) × (lr_ref_hidden / hidden) / layers

where global = world_size × train.batch_size streams: the square root of the batch (AdamW's
noise-matching rule), the inverse of the width (Adam moves every weight by about the rate, so a
unit's input moves in proportion to its fan-in), and the inverse of the depth (a stack stalls on
the unigram plateau at the rate a single layer takes). `linear` makes the batch term linear;
`none` uses `train.lr` as written, whatever the shape. Each term rests on the sweep in
docs/lr_sweep.md (`python -m lstm_dist.lr_sweep`), where the defaults are compared with the best of
a sweep in every cell.

Nothing is adjusted behind the user's back: `--print-config` ends with the rule's inputs and
result, and the line that starts training says which rate the rule gave and why.
"""

from __future__ import annotations

import math

from .config import Config


def global_batch(cfg: Config, world: int) -> int:
    """Streams that one optimizer step averages over: every rank's `batch_size` streams."""
    return world * cfg.train.batch_size


def scale_factor(cfg: Config, world: int) -> float:
    """How much the rule multiplies `train.lr` by for this world size, batch, width and depth."""
    t, m = cfg.train, cfg.model
    if t.lr_scaling == "none":
        return 1.0
    ratio = global_batch(cfg, world) / t.lr_ref_batch
    batch = math.sqrt(ratio) if t.lr_scaling == "sqrt" else ratio
    return batch * (t.lr_ref_hidden / m.hidden) / m.layers


def peak_lr(cfg: Config, world: int) -> float:
    """The peak learning rate of a run (after warm-up, before decay)."""
    return cfg.train.lr * scale_factor(cfg, world)


def explain(cfg: Config, world: int) -> str:
    """One phrase for logs: the rate the rule gave and where it came from."""
    t, m = cfg.train, cfg.model
    peak = peak_lr(cfg, world)
    if t.lr_scaling == "none":
        return f"peak lr {peak:.4g} (train.lr as written: train.lr_scaling=none)"
    g = global_batch(cfg, world)
    batch = f"sqrt({g} / {t.lr_ref_batch})" if t.lr_scaling == "sqrt" else f"({g} / {t.lr_ref_batch})"
    return (f"peak lr {peak:.4g} = train.lr {t.lr:.4g} × {batch} streams × ({t.lr_ref_hidden} / {m.hidden}) "
            f"units / {m.layers} layer{'s' if m.layers > 1 else ''} (train.lr_scaling={t.lr_scaling}, "
            f"lr_ref_batch {t.lr_ref_batch}, lr_ref_hidden {t.lr_ref_hidden})")


def print_config_note(cfg: Config, world: int) -> str:
    """A YAML comment line for `--print-config`: the rule's result for this launch's world size."""
    return (f"# learning-rate rule for world_size={world} (WORLD_SIZE, 1 without torchrun): "
            f"{explain(cfg, world)}\n")
