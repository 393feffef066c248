"""The optimizer and its learning-rate schedule, built from `train.*` settings.

`build_optimizer` puts weight decay on the matrices only (the LSTM's and the head's), never on
biases or the embedding; `lr_at(step)` is the rate of optimizer step `step` (1-based): a linear
warm-up from 0, then a `cosine`, `linear` or `constant` decay to `lr · min_lr_ratio` at the last step.
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_at(step: int, t: TrainConfig, peak: float | None = None) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up, then the decay to peak·min_lr_ratio.
    `peak` is the rate lr_rule gives the run (default: t.lr as written)."""
    top = t.lr if peak is None else peak
    if t.warmup_steps and step <= t.warmup_steps:
        return top * step / t.warmup_steps
    if t.schedule == "constant":
        return top
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    low = top * t.min_lr_ratio
    if t.schedule == "linear":
        return top - (top - low) * progress
    return low + 0.5 * (top - low) * (1.0 + math.cos(math.pi * progress))


def schedule_phrase(t: TrainConfig) -> str:
    """The schedule in words, for the line that starts training."""
    after = "then constant" if t.schedule == "constant" else f"{t.schedule} decay to {t.min_lr_ratio:g} of it"
    return f"warm-up {t.warmup_steps} steps, {after}"


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum `beta1`) with two groups: the matrices decayed, the rest not."""
    # Weight decay on the matrices of the LSTM and the head; not on biases, nor on the embedding
    # (a table lookup, decaying it only shrinks rare characters' rows).
    embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embedding_params else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.beta1)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
