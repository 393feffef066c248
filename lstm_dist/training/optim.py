"""The optimizer and its learning-rate schedule, built from `train.*` settings.

`build_optimizer` puts weight decay on the matrices only (the LSTM's and the head's), never on
biases or the embedding; `lr_at(step)` is the rate of optimizer step `step` (1-based): a linear
warm-up from 0, then a `cosine`, `linear` or `constant` decay to `lr · min_lr_ratio` at the last step.
"""

from __future__ import annotations

import math

import torch

from lstm_dist.config import TrainConfig


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


class Schedule:
    """The rate of every optimizer step of a run: `lr_at` of its settings, or, once a resume changed
    them under `train.resume_schedule=continue`, a schedule anchored at the resume step.

    Anchored at (step r, fraction m), m being the rate in force at step r as a fraction of the peak
    it was on, the rate goes on from m × the new peak along the new settings' shape: still warming
    up, linearly from m to 1 at `warmup_steps`, then their decay; past the warm-up, from the point
    of the new `cosine` or `linear` decay where it stands at m, over the steps left to `steps`
    (`constant`: the peak). So extending a finished run keeps its final rate, lengthening one half
    way stretches the rest of its decay, a new `train.lr` alone scales the old curve from the next
    step on, and nothing jumps unless the peak or the floor was asked to. The anchor is part
    of the run's state: a checkpoint keeps it (`state_dict`), so a later resume with unchanged
    settings follows the same rates bit for bit.
    """

    def __init__(self, t: TrainConfig, peak: float, anchor: tuple[int, float] | None = None) -> None:
        self.t, self.peak, self.anchor = t, peak, anchor

    def lr(self, step: int) -> float:
        """The rate of optimizer step `step` (1-based)."""
        if self.anchor is None:
            return lr_at(step, self.t, self.peak)
        return self.peak * self._fraction(step)

    def _fraction(self, step: int) -> float:
        (r, m), t = self.anchor, self.t
        if step <= r:
            return m
        if step <= t.warmup_steps:  # r < step <= the warm-up's end: carry on warming up from m
            return m + (1.0 - m) * (step - r) / (t.warmup_steps - r)
        if t.schedule == "constant":
            return 1.0
        low = t.min_lr_ratio
        if r >= t.warmup_steps:  # where on the new decay the fraction m lies, and on from there
            start, p0 = r, self._progress_at(m)
        else:
            start, p0 = t.warmup_steps, 0.0
        progress = p0 + (1.0 - p0) * min(1.0, (step - start) / max(1, t.steps - start))
        if t.schedule == "linear":
            return 1.0 - (1.0 - low) * progress
        return low + 0.5 * (1.0 - low) * (1.0 + math.cos(math.pi * progress))

    def _progress_at(self, fraction: float) -> float:
        """The progress in [0, 1] at which the decay is at `fraction` of the peak (clamped)."""
        low = self.t.min_lr_ratio
        if low >= 1.0:
            return 0.0
        x = min(1.0, max(0.0, (fraction - low) / (1.0 - low)))  # 1 at the peak, 0 at the floor
        if self.t.schedule == "linear":
            return 1.0 - x
        return math.acos(2.0 * x - 1.0) / math.pi

    def continued(self, step: int, old: "Schedule") -> None:
        """Anchor this schedule at `step`, at the fraction of its peak that `old` was on there."""
        self.anchor = (step, old.lr(step) / old.peak)

    def shape(self) -> tuple:
        """What the rates depend on: two schedules with the same shape give the same rates."""
        t = self.t
        return (t.steps, t.warmup_steps, t.schedule, t.min_lr_ratio, self.peak, self.anchor)

    def state_dict(self) -> dict:
        return {"anchor": None if self.anchor is None else [int(self.anchor[0]), float(self.anchor[1])]}

    def load_state_dict(self, state: dict | None) -> None:
        anchor = (state or {}).get("anchor")
        self.anchor = None if anchor is None else (int(anchor[0]), float(anchor[1]))


def schedule_phrase(t: TrainConfig) -> str:
    """The schedule in words, for the line that starts training."""
    after = "then constant" if t.schedule == "constant" else f"{t.schedule} decay to {t.min_lr_ratio:g} of it"
    return f"warm-up {t.warmup_steps} steps, {after}"


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum `beta1`) with two groups: the matrices decayed, the rest not.

    Both are torch's fused implementations (`fused=True`: one kernel over all parameters on CUDA,
    one vectorised loop on the CPU; ~5x faster than the for-each one on 2 CPU cores at 13M
    parameters) because they take a `found_inf` flag, a 0-d tensor on the device (`TrainingStep.apply`):
    a failed step is skipped on the device, with no host read, its step count and moments left as they
    were. The rate is a 0-d tensor on the parameters' device (`set_lr` writes it in place), so a step
    reads nothing the host sets between steps: what CUDA-graph capture asks. SGD's momentum buffers
    start at zeros (the first update, buffer = gradient, is the same; and a skipped first step leaves
    no uninitialised buffer behind)."""
    # Weight decay on the matrices of the LSTM and the head; not on biases, nor on the embedding
    # (a table lookup, decaying it only shrinks rare characters' rows).
    embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embedding_params else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.beta1, fused=True)
        if t.beta1:
            for p in model.parameters():
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)
    set_lr(optimizer, t.lr)
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to `lr`: AdamW's 0-d tensor on the parameters' device, written in place
    (no host synchronisation: a fill kernel on CUDA); a float where the group holds one (SGD's fused
    step takes a float only), or where a loaded state_dict put a float or a CPU tensor back."""
    for group in optimizer.param_groups:
        rate = group["lr"]
        device = group["params"][0].device
        if isinstance(optimizer, torch.optim.SGD):
            group["lr"] = float(lr)
        elif isinstance(rate, torch.Tensor) and rate.device == device and rate.dim() == 0:
            rate.fill_(lr)
        else:
            group["lr"] = torch.full((), lr, dtype=torch.float32, device=device)

