"""The learning-rate rule: the peak rate a run uses, from `train.lr` and the run's shape.

`train.lr` is the peak rate of one LSTM layer `train.lr_ref_hidden` units wide trained on a global
batch of `train.lr_ref_batch` streams. With `train.lr_scaling=rule` (the default) a run of another
shape gets

    peak = lr × (global / lr_ref_batch)^lr_batch_exponent
              × (lr_ref_hidden / hidden)^lr_width_exponent
              / layers^lr_depth_exponent

where global = train.global_batch_size streams, or world_size × train.batch_size without it
(`training.batching.global_batch`): with a global batch set, the rate is the same on any number of
processes. The exponents are settings, not constants:
the defaults are what the sweep in docs/lr_sweep.md (`python -m lstm_dist.lr_sweep`) measured on
2 CPU cores, and a sweep on other hardware can replace them. `train.lr_scaling=none` uses
`train.lr` as written, whatever the shape.

Nothing is adjusted behind the user's back: `--print-config` ends with the rule's inputs and
result, and the line that starts training says which rate the rule gave and why.
"""

from __future__ import annotations

from lstm_dist.config import Config
from lstm_dist.training import batching


def global_batch(cfg: Config, world: int) -> int:
    """Streams that one optimizer step averages over (`batching.global_batch`)."""
    return batching.global_batch(cfg.train, world)


def scale_factor(cfg: Config, world: int) -> float:
    """How much the rule multiplies `train.lr` by for this world size, batch, width and depth."""
    t, m = cfg.train, cfg.model
    if t.lr_scaling == "none":
        return 1.0
    return ((global_batch(cfg, world) / t.lr_ref_batch) ** t.lr_batch_exponent
            * (t.lr_ref_hidden / m.hidden) ** t.lr_width_exponent
            / m.layers ** t.lr_depth_exponent)


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
    return (f"peak lr {peak:.4g} = train.lr {t.lr:.4g} × ({g} / {t.lr_ref_batch} streams)^{t.lr_batch_exponent:g}"
            f" × ({t.lr_ref_hidden} / {m.hidden} units)^{t.lr_width_exponent:g}"
            f" / ({m.layers} layer{'s' if m.layers > 1 else ''})^{t.lr_depth_exponent:g} (train.lr_scaling=rule)")


def print_config_note(cfg: Config, world: int) -> str:
    """A YAML comment line for `--print-config`: the rule's result for this launch's world size."""
    return (f"# learning-rate rule for world_size={world} (WORLD_SIZE, 1 without torchrun): "
            f"{explain(cfg, world)}\n")
