"""Checkpoint state from the objects that own it: each piece has `state_dict()` / `load_state_dict()`
(`checkpoint.Stateful`).

A checkpoint is built from a dict of such pieces (`checkpoint.Pieces`; the trainer builds it, and
documents the file's layout there: `training.loop.checkpoint_pieces`). Objects that have the two
methods already are pieces as they are: the optimizer, the learning-rate schedule (`optim.Schedule`),
the training stream (`data.streams.TokenStream`), the failed-step counter (`stopping.NonFinite`).
Here are the others: the trainer's own counters and carried state (`Progress`), the weights as
CPU tensors (`ModelWeights`), and this process's random generators (`RandomGenerators`).

Every value a piece returns is a tensor or a plain Python value, so a checkpoint loads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch

from lstm_dist.model.char_lstm import State
from lstm_dist.training.stopping import NonFinite


class Progress:
    """The trainer's own state: optimizer steps taken (`step`; a checkpoint is named by it), the
    step of the checkpoint last written or resumed from (`saved_at`), failed steps (`nonfinite`,
    its total a checkpoint piece of its own), and this rank's carried (h, c) `state`, None where
    the next window starts from zeros (`state_piece` is its checkpoint piece)."""

    def __init__(self, max_nonfinite: int, device: torch.device) -> None:
        self.step = 0
        self.saved_at: int | None = None
        self.nonfinite = NonFinite(max_nonfinite)
        self.state: Optional[State] = None
        self.state_piece = _StatePiece(self, device)


class _StatePiece:
    """`Progress.state` as a checkpoint piece: (h, c) on the CPU, or None; loaded back onto `device`."""

    def __init__(self, progress: Progress, device: torch.device) -> None:
        self.progress, self.device = progress, device

    def state_dict(self) -> Optional[State]:
        state = self.progress.state
        return None if state is None else (state[0].detach().cpu(), state[1].detach().cpu())

    def load_state_dict(self, saved: Optional[State]) -> None:
        self.progress.state = None if saved is None else (saved[0].to(self.device), saved[1].to(self.device))

    def load_resliced(self, entries: list[Optional[State]], rank: int, world: int) -> None:
        """This rank's share of the global streams' states written by another number of processes:
        `entries` are every old rank's (h, c), each [layers, streams of that rank, hidden], in rank order
        (rank r held streams [r·n, (r+1)·n)); joined along the streams, this rank takes streams
        [rank·G/world, (rank+1)·G/world) of the G. None when any old rank had none (the next window
        starts from zeros: at a window where every rank had none, as every rank resets together)."""
        if any(e is None for e in entries):
            self.progress.state = None
            return
        h, c = (torch.cat([e[i] for e in entries], dim=1) for i in (0, 1))
        share = h.shape[1] // world
        rows = slice(rank * share, (rank + 1) * share)
        self.load_state_dict((h[:, rows].contiguous(), c[:, rows].contiguous()))


class ModelWeights:
    """A model's weights as a checkpoint piece: CPU copies of its state_dict (device-independent)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        """Raises RuntimeError (missing, unexpected or mis-shaped keys) or KeyError/TypeError (no weights)."""
        self.model.load_state_dict(saved)


class RandomGenerators:
    """This process's generators as a checkpoint piece: torch's, numpy's, Python's (and, on CUDA,
    the device's), as tensors and plain values."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate(),
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)
