"""How one optimizer step's streams are laid out over the ranks and their forward passes.

`train.global_batch_size` G streams make one optimizer step, whatever the number of processes W
(torchtitan's global batch size; nanoGPT's batch × gradient_accumulation_steps × processes). The
training split is cut into G streams (`data.streams.TokenStream`), rank r reads streams
[r·G/W, (r+1)·G/W), and runs them through the model `train.batch_size` B at a time (a micro-batch),
accumulating the gradients of G/(W·B) forward passes before DDP all-reduces them once
(`training.step.TrainingStep`). Every world size therefore reads the same streams in the same order,
carries the same hidden states and takes the same steps; only the float summation order differs.

Without `train.global_batch_size` (0, the default) the global batch is W × B and every rank runs
its B streams in one pass: the meaning `train.batch_size` always had.
"""

from __future__ import annotations

from dataclasses import dataclass

from lstm_dist.common.errors import EveryRankError


@dataclass(frozen=True)
class BatchLayout:
    """Streams of one optimizer step: `global_batch` in all, `per_rank` on each of `world` ranks, in
    `accumulation` forward passes of `micro` streams each (gradient accumulation steps)."""

    world: int
    global_batch: int
    micro: int
    explicit: bool = False  # set by train.global_batch_size (else world × micro)

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world

    @property
    def accumulation(self) -> int:
        return self.per_rank // self.micro

    def describe(self) -> str:
        """For the start line: `4 streams`, or with `train.global_batch_size` `4 streams (8 in all:
        train.global_batch_size)`, `4 streams in 2 micro-batches of 2 (8 in all: train.global_batch_size)`."""
        passes = f" in {self.accumulation} micro-batches of {self.micro}" if self.accumulation > 1 else ""
        whole = f" ({self.global_batch} in all: train.global_batch_size)" if self.explicit else ""
        return f"{self.per_rank} streams{passes}{whole}"


def global_batch(train, world: int) -> int:
    """Streams of one optimizer step across all ranks: `train.global_batch_size`, or world × `train.batch_size`
    without it. Needs no check (the learning-rate rule and `--print-config` use it for any world size)."""
    return train.global_batch_size or world * train.batch_size


def batch_layout(train, world: int) -> BatchLayout:
    """The layout of `train` (a TrainConfig) on `world` ranks. Raises EveryRankError (every rank reads
    the same config and world size) when `train.global_batch_size` is not a multiple of world ×
    `train.batch_size`: the streams would not divide evenly into the ranks' forward passes. The one check
    of the two settings together (it knows the world size, so the `batch_size` it suggests fits); the
    trainer makes it before anything is read."""
    g, b = global_batch(train, world), train.batch_size
    if g % (world * b):
        fits = [m for m in range(b, 0, -1) if g % (world * m) == 0]
        hint = (f"set train.batch_size={fits[0]} (streams per forward pass)" if fits else
                f"run on a number of processes that divides {g}")
        raise EveryRankError(
            f"train.global_batch_size={g} streams cannot be split over {world} process(es) in forward passes of "
            f"train.batch_size={b}: it must be a multiple of {world} × {b} = {world * b}; {hint}, or set "
            f"train.global_batch_size to a multiple of {world * b}")
    return BatchLayout(world, g, b, explicit=bool(train.global_batch_size))


def print_config_note(train, world: int) -> str:
    """A YAML comment line for `--print-config`: how this launch's world size runs the global batch."""
    try:
        layout = batch_layout(train, world)
    except EveryRankError as exc:
        return f"# batch for world_size={world} (WORLD_SIZE, 1 without torchrun): does not fit: {exc}\n"
    return (f"# batch for world_size={world} (WORLD_SIZE, 1 without torchrun): {layout.global_batch} streams a step, {layout.per_rank} per process in "
            f"{layout.accumulation} forward pass(es) of {layout.micro}\n")
