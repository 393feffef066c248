"""Every random generator a training run draws from, and its seed (`run.seed` = s).

- model initialisation: s on every rank, so all ranks start from the same weights;
- each rank's own stream (dropout masks) from then on: s + 1000·rank + 1 (the +1 keeps rank 0's
  stream apart from the initialisation's; ranks 1000 apart per seed value);
- after a re-cut resume at step k: that plus 7919·k, so the continued run does not replay the
  dropout masks of its first steps (7919, a prime, keeps step offsets off the rank offsets);
- the text sample at step k: s + k, in its own torch.Generator (`sampling`), never these;
- the epoch offsets of the training streams: numpy's default_rng([s, epoch]) (`streams`).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def init_seed(seed: int) -> int:
    return seed


def rank_seed(seed: int, rank: int) -> int:
    return seed + 1000 * rank + 1


def recut_seed(seed: int, rank: int, step: int) -> int:
    return rank_seed(seed, rank) + 7919 * step


def sample_seed(seed: int, step: int) -> int:
    return seed + step


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators (CUDA's follow torch.manual_seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
