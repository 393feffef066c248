"""Training windows and evaluation batches over a split (a token array, usually a `Corpus` memmap).

Training (`TokenStream`): the split, after a per-epoch offset, is cut into ``world*batch``
contiguous streams of equal length (`batch` is a rank's share of the global batch: `training.batching`);
rank r reads streams [r*batch, (r+1)*batch) and window k of
every stream covers its characters [k*bptt, k*bptt+bptt] (x is the first bptt of them, y the last
bptt). Ranks never share a training character in one epoch. Evaluation (`eval_batches`) instead
scores every predictable position of a split exactly once, the short tail included, each segment
after reading the text just before it as unscored context.
"""

from __future__ import annotations

import enum
from typing import Iterator, NamedTuple

import numpy as np
import torch

from lstm_dist.common.errors import UserError

class Restore(enum.Enum):
    """How `TokenStream.load_state_dict` continued: exactly, or re-cut for another layout."""

    EXACT = "exact"
    RECUT = "recut"


class Batch(NamedTuple):
    x: torch.Tensor  # int64 [batch, bptt]
    y: torch.Tensor  # int64 [batch, bptt], x shifted by one character
    epoch: int
    window: int
    reset: bool  # first window of an epoch: the trainer zeroes the hidden state


class EvalBatch(NamedTuple):
    x: torch.Tensor  # int64 [batch, bptt]
    y: torch.Tensor  # int64 [batch, bptt]
    mask: torch.Tensor  # bool [batch, bptt]: True where y is a target to score (not context, not past the end)
    reset: bool  # first window of the segments: start from a zero hidden state


def _gather(data: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """data[starts[i] + j] for j < width, in one fancy-indexing read of the memmap."""
    return np.asarray(data[np.add.outer(starts, np.arange(width, dtype=np.int64))])


class TokenStream:
    """Truncated-BPTT training windows of one rank over a split, with a resumable cursor.

    After the epoch's offset o (0 in epoch 0 or without `random_offset`; otherwise drawn in
    [0, bptt) from (seed, epoch), identical on every rank), the split is cut into world*batch
    streams of `stream_len` characters; stream s starts at o + s*stream_len, and rank r owns
    streams [r*batch, (r+1)*batch). Window k reads characters [k*bptt, k*bptt + bptt] of each
    stream. The stream length leaves room for the largest offset, so every epoch has the same
    `windows_per_epoch`.
    """

    def __init__(self, data: np.ndarray, rank: int, world: int, batch: int, bptt: int,
                 seed: int = 0, random_offset: bool = True) -> None:
        if world < 1 or batch < 1 or bptt < 1 or not 0 <= rank < world:
            raise ValueError(f"bad layout rank={rank} world={world} batch={batch} bptt={bptt}")
        self.data, self.rank, self.world, self.batch, self.bptt = data, rank, world, batch, bptt
        self.seed, self.random_offset = int(seed), bool(random_offset)
        self.n = int(len(data))
        streams = world * batch
        self._slack = bptt - 1 if random_offset else 0  # room kept for the largest epoch offset
        need = streams * (bptt + 1) + self._slack
        if self.n < need:
            raise UserError(
                f"the split has {self.n} characters but world_size*batch*(bptt+1){' + bptt-1' if self._slack else ''} = "
                f"{world}*{batch}*{bptt + 1}{f' + {self._slack}' if self._slack else ''} = {need} are needed; "
                "lower the batch size, bptt or the number of processes, or use a larger corpus"
            )
        self.stream_len = (self.n - self._slack) // streams
        self.windows_per_epoch = (self.stream_len - 1) // bptt
        self._cols = np.arange(rank * batch, (rank + 1) * batch, dtype=np.int64) * self.stream_len
        self.epoch, self.window, self.offset = 0, 0, 0

    def _offset_for(self, epoch: int) -> int:
        if epoch == 0 or not self.random_offset or self.bptt == 1:
            return 0
        return int(np.random.default_rng([self.seed, epoch]).integers(0, self.bptt))

    def next(self) -> Batch:
        if self.window >= self.windows_per_epoch:
            self.epoch += 1
            self.window = 0
            self.offset = self._offset_for(self.epoch)
        starts = self.offset + self._cols + self.window * self.bptt
        chunk = torch.from_numpy(_gather(self.data, starts, self.bptt + 1)).long()
        b = Batch(chunk[:, :-1], chunk[:, 1:], self.epoch, self.window, self.window == 0)
        self.window += 1
        return b

    __next__ = next

    def __iter__(self) -> "TokenStream":
        return self

    def state_dict(self) -> dict:
        """The cursor and the layout it belongs to, as plain ints (bools for flags)."""
        return {"epoch": self.epoch, "window": self.window, "offset": self.offset,
                "world": self.world, "batch": self.batch, "bptt": self.bptt, "n": self.n}

    def load_state_dict(self, sd: dict) -> "Restore":
        """Continue from `sd`, and say how. Same layout (world*batch, bptt and split length):
        `Restore.EXACT`, the very next window. Otherwise `Restore.RECUT`: same epoch, the window
        that has consumed the same number of characters (rounded down), this layout's offset; the
        caller must then start from zero hidden states."""
        epoch, window = int(sd["epoch"]), int(sd["window"])
        same = (int(sd["world"]) * int(sd["batch"]) == self.world * self.batch
                and int(sd["bptt"]) == self.bptt and int(sd["n"]) == self.n)
        if same:
            self.epoch, self.window, self.offset = epoch, window, int(sd["offset"])
            return Restore.EXACT
        consumed = window * int(sd["world"]) * int(sd["batch"]) * int(sd["bptt"])
        self.epoch = epoch
        self.offset = self._offset_for(epoch)
        self.window = min(consumed // (self.world * self.batch * self.bptt), self.windows_per_epoch)
        return Restore.RECUT


def eval_segments(n: int, streams: int) -> np.ndarray:
    """Boundaries b[0..streams] of the evaluation segments: segment s scores target positions
    [b[s], b[s+1]) of a split of n tokens. Targets are positions 1..n-1: the first token has no
    context to be predicted from, so it is never scored."""
    targets = max(n - 1, 0)
    return 1 + (np.arange(streams + 1, dtype=np.int64) * targets) // streams


def rank_segments(n: int, rank: int, world: int, batch: int, bptt: int, max_windows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), int64 [batch] each: the target positions [lo, hi) that rank `rank` scores of a split of `n`
    tokens, its `batch` of the world × batch segments (`eval_segments`), each cut to its first
    max_windows × bptt targets where `max_windows` > 0."""
    bounds = eval_segments(n, world * batch)
    lo, hi = bounds[rank * batch:(rank + 1) * batch], bounds[rank * batch + 1:(rank + 1) * batch + 1]
    if max_windows:
        hi = np.minimum(hi, lo + max_windows * bptt)
    return lo, hi


def eval_batches(data: np.ndarray, rank: int, world: int, batch: int, bptt: int, *, context: int = 0,
                 max_windows: int = 0) -> Iterator[EvalBatch]:
    """Every predictable position of `data` exactly once across all ranks, each with the text before it.

    Target positions 1..n-1 are cut into world*batch contiguous segments as equal as possible
    (`eval_segments`); rank r reads segments [r*batch, (r+1)*batch), window by window (bptt positions
    each, the hidden state carried between windows); x at a target p is token p-1. A segment that
    starts at position lo first reads the `context` positions before it, [max(1, lo - context), lo),
    from a zero state: they go through the model (its hidden state then holds that text, as it would
    in one long stream) but `mask` leaves them out, so nothing is scored twice. The first segment
    (lo = 1) has nothing before it. `max_windows` > 0 scores only the first max_windows*bptt
    targets of each segment (after its context). `mask` marks the targets to score; x and y are the
    real tokens wherever a segment is read (context included) and 0 past its end, in the partial
    last window. Segments may be empty (n-1 < world*batch); ranks may yield different numbers of
    windows, so do not put collectives inside the loop. Raises ValueError on a bad layout, or a
    negative `context` or `max_windows`.
    """
    if world < 1 or batch < 1 or bptt < 1 or not 0 <= rank < world or context < 0 or max_windows < 0:
        raise ValueError(f"bad layout rank={rank} world={world} batch={batch} bptt={bptt} context={context} "
                         f"max_windows={max_windows}")
    n = int(len(data))
    lo, hi = rank_segments(n, rank, world, batch, bptt, max_windows)
    # the first position each segment reads: its context before lo; an empty segment reads nothing
    start = np.where(hi > lo, np.maximum(1, lo - context), lo)
    longest = int((hi - start).max()) if n > 1 else 0
    cols = np.arange(bptt, dtype=np.int64)
    for k in range(-(-longest // bptt)):
        first = start + k * bptt  # first position of this window, per segment
        pos = np.add.outer(first, cols)
        inside = pos < hi[:, None]  # read: context or target
        # read [first-1, first+bptt) clipped into the split, then blank what lies past the segment's end
        idx = np.minimum(np.add.outer(first - 1, np.arange(bptt + 1, dtype=np.int64)), n - 1)
        chunk = np.asarray(data[idx]).astype(np.int64)
        x = np.where(inside, chunk[:, :-1], 0)  # separate arrays: x and y overlap inside chunk
        y = np.where(inside, chunk[:, 1:], 0)
        scored = inside & (pos >= lo[:, None])
        yield EvalBatch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(scored), k == 0)
