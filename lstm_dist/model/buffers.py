"""Reuse of the fast LSTM's big per-window CPU buffers: `BufferPool`, and `POOL`, the process's one pool
(the fast layer and its time loops take their buffers and per-step views from it)."""

from __future__ import annotations

import math
import threading
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor


class BufferPool:
    """Reuse of the big per-window buffers (gates, states, their gradients) on CPU.

    A fresh CPU tensor of tens of MB comes from mmap and is page-faulted in on first touch: measured
    ~50 ms per 67 MB here, i.e. a sixth of a whole training window at the default shape. The pool keeps
    such buffers and hands out *views* of them; a buffer is handed out again only when nothing else
    holds its storage (no saved tensor, no output, no view: storage use count back to the pool's own),
    so reuse can never alias live data. CUDA's caching allocator already does this, so CUDA (and any
    torch without the use-count hook) gets plain `torch.empty`.

    The time loops index a buffer one step at a time through per-step views (`steps`). Making them
    costs ~0.4 µs a view, ~1 ms a layer and window at bptt 128 (some 20 views a step); for a pooled
    buffer they are made once and kept with it, and count as the pool's own users of its storage.
    """

    MAX_BYTES = 4 << 30  # beyond this, allocate without pooling
    MIN_BYTES = 1 << 20  # small tensors come from the allocator's normal path

    def __init__(self) -> None:
        self._free: dict = {}
        self._views: Dict[int, dict] = {}  # pooled buffer's data_ptr -> {(shape, dtype, lo, hi): views}
        self._held: Dict[int, int] = {}  # pooled buffer's data_ptr -> storage users among those views
        self._bytes = 0
        self._lock = threading.Lock()
        self._use_count = getattr(torch._C, "_storage_Use_Count", None)
        self._base = self._count(torch.empty(1)) if self._use_count is not None else None

    def _count(self, t: Tensor) -> int:
        return self._use_count(t.untyped_storage()._cdata)

    def empty(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if device.type != "cpu" or self._use_count is None or nbytes < self.MIN_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        key = (tuple(shape), dtype)
        with self._lock:
            bufs = self._free.setdefault(key, [])
            for buf in bufs:
                if self._count(buf) <= self._base + self._held[buf.data_ptr()]:
                    return buf.view(shape)  # a new view: counts as a user of the storage
            buf = torch.empty(shape, dtype=dtype, device=device)
            if self._bytes + nbytes <= self.MAX_BYTES:
                bufs.append(buf)
                self._views[buf.data_ptr()] = {}
                self._held[buf.data_ptr()] = 0
                self._bytes += nbytes
            return buf.view(shape)

    def steps(self, t: Tensor, lo: Optional[int] = None, hi: Optional[int] = None) -> Tuple[Tensor, ...]:
        """`t[..., lo:hi].unbind(0)`: the per-step views of t (columns lo:hi of its last dimension);
        kept and handed out again when t is a whole pooled buffer, made afresh otherwise."""
        part = t if lo is None else t[..., lo:hi]
        ptr = t.data_ptr()
        with self._lock:
            cache = self._views.get(ptr)
            if cache is None or t.storage_offset() != 0:
                return part.unbind(0)
            key = (tuple(t.shape), t.dtype, lo, hi)
            views = cache.get(key)
            if views is None:
                views = cache[key] = part.unbind(0)
                self._held[ptr] += len(views)
            return views

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._views.clear()
            self._held.clear()
            self._bytes = 0


POOL = BufferPool()  # the process's pool: buffers of every layer and window, reused once free
