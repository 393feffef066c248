"""CUDA graphs over the time loops (model.cuda_graphs): per layer, the forward loop and the backward loop
of a training window recorded once and replayed every window after.

Why: on CUDA each op of a time step is a kernel launch issued by the host, 5-40 µs of host time each
against a few µs of GPU work at the cluster shape (docs/gpu.md), so the loops are bound by the host.
Replayed from a graph, a window's T steps are one launch from the host, whichever steps the kernel
table's entry runs (eager, compiled or Triton: `Kernels.for_window`); graphs and the entries combine.

What is recorded is the time loops only, over static buffers (the loops' contract, `lstm_dist.model.loops`):
the input projection, the weight gradients, the head, DDP and clipping stay outside (a few large kernels
per window). A static set (`WindowSet`) holds

    gates [T,B,4H], hs, cs [T+1,B,H]    the forward's buffers: the window writes x Wᵀ + b and the
                                        initial state into them, and keeps them as its own (saved for
                                        its backward; y is a view of hs), so nothing is copied out
    u  [4H,H]                           weight_hh, copied in before each forward replay (one copy: a
                                        graph reads addresses, and a parameter's may change)
    dy [T,B,H], dc [B,H], dgates        the backward's: dy and dc_T copied in, dc_{-1} copied out,
                                        dgates read by the weight-gradient products after the loop

Sets are keyed by (device, T, B, H, weight dtype, state dtype, products' dtype, kernels). The layers of
a model take one set each, in order: a window takes the first set of its key that nothing else holds
(the storage use count of gates, hs and cs is the set's own: no saved tensor, output or view of them
lives), so the second layer finds the first layer's set held by its pending backward and takes the
next. A set is therefore never written while a window still needs what is in it.

A set's life, each direction on its own: its first `WARMUP` windows run the loops on its buffers on a
side stream (compiling, Triton's JIT and cuBLAS's workspaces happen there, outside any graph), the next
window captures them (`torch.cuda.graph`, one memory pool for every graph of the process: the loops'
temporaries are dead between replays and replays never overlap, all being on the stream of the
training step) and replays; every later window replays.

Which windows: those that record autograd history on CUDA (training windows; an evaluation or a
generation, under no_grad, with its own batches and a short last window, runs without graphs) while
fewer than `MAX_SETS` sets exist and their buffers fit in `MAX_SHARE` of the GPU's memory; any other
runs as it would without graphs. `clear()` drops every set
(the bench, between shapes). On the CPU no graph exists; `Kernels(force=True)` runs the same bookkeeping
with a replay that runs the recorded loops again on the same buffers (`tests/test_graphs.py`).

Failure: a capture that raises (an op that cannot be captured, a driver or torch without graphs) is
recorded (`failure()`); that window and every later one in the process run without graphs. A training
run agrees on it across ranks at its next log step and says it once (`training.loop`), as for compile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import torch
from torch import Tensor

from lstm_dist.common.errors import first_line

if TYPE_CHECKING:  # annotations only: kernels.py imports this module
    from lstm_dist.model.kernels import Kernels, KernelSpec

WARMUP = 2  # windows a set runs before it captures (each direction)
MAX_SETS = 16  # sets in the process at most
# and their buffers' bytes at most, as a share of the device's memory (a set at the cluster shape, 128 x 2048,
# bptt 256, fp32 state: gates, dgates 1.07 GB each, hs, cs, dy 0.27 GB each, U 0.07 GB: 3 GB a layer)
MAX_SHARE = 0.25
CPU_BYTES = 4 << 30  # the CPU's stand-in: a fixed budget

_FAILURE: Optional[str] = None  # why capturing failed in this process (None: it has not)


def failure() -> Optional[str]:
    """Why graphs stopped in this process ("RuntimeError: ..."), or None."""
    return _FAILURE


def disable(why: str) -> None:
    """No graphs from now on in this process (every rank does so together when one rank's capture
    failed: `training.loop`), keeping the first reason; sets already made are dropped."""
    global _FAILURE
    if _FAILURE is None:
        _FAILURE = why
    SETS.clear()


def available() -> bool:
    """False once a capture has failed in this process, or `disable` was called."""
    return _FAILURE is None


# ---------------------------------------------------------------------------- recording and replaying


class _CudaGraphs:
    """Warm-up on a side stream, capture into a `torch.cuda.CUDAGraph`, replay on the current stream."""

    def __init__(self) -> None:
        self.pool = None
        self.side: Dict[torch.device, torch.cuda.Stream] = {}

    def warm(self, fn: Callable[[], None], device: torch.device) -> None:
        side = self.side.get(device)
        if side is None:
            side = self.side[device] = torch.cuda.Stream(device)
        here = torch.cuda.current_stream(device)
        side.wait_stream(here)
        with torch.cuda.stream(side):
            fn()
        here.wait_stream(side)

    def capture(self, fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the backward is captured on autograd's device thread; another thread's CUDA
        # calls (the host copying the next batch) do not invalidate it
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            fn()
        return graph.replay


class _Rerun:
    """The CPU's stand-in (`Kernels(force=True)`): warm-up runs the loops, the "replay" runs the recorded
    closure again on the same buffers, what a graph's replay computes. It lets the CPU tests check the
    bookkeeping (addresses, sets, copies in and out) with the real loops."""

    def warm(self, fn: Callable[[], None], device: torch.device) -> None:
        fn()

    def capture(self, fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
        return fn


_RECORDERS = {"cuda": _CudaGraphs(), "cpu": _Rerun()}


@dataclass
class Phase:
    """One direction of a set: windows run on the side stream, captured, replayed (the counters are
    what the tests and the bench read)."""

    warmed: int = 0
    captured: int = 0
    replayed: int = 0
    replay: Optional[Callable[[], None]] = field(default=None, repr=False)

    def run(self, fn: Callable[[], None], device: torch.device) -> None:
        recorder = _RECORDERS[device.type]
        if self.replay is None and _FAILURE is None and self.warmed >= WARMUP:
            try:
                self.replay = recorder.capture(fn, device)
                self.captured += 1
            except Exception as exc:  # noqa: BLE001 - whatever stops a capture means: no graphs here
                disable(f"{type(exc).__name__}: {first_line(exc)}")
        if self.replay is not None:
            self.replay()
            self.replayed += 1
        elif _FAILURE is None:
            recorder.warm(fn, device)
            self.warmed += 1
        else:
            fn()  # a capture failed (this window's or an earlier one's): these buffers, no graph


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # how a set tells it is free; without it, no graphs


def _storage_users(t: Tensor) -> int:
    return _USE_COUNT(t.untyped_storage()._cdata)


_BASE_USERS: Optional[int] = None


def _only_ours(t: Tensor) -> bool:
    """Whether nothing but the set holds t's storage (no saved tensor, output or view)."""
    global _BASE_USERS
    if _BASE_USERS is None:
        _BASE_USERS = _storage_users(torch.empty(1))
    return _storage_users(t) <= _BASE_USERS


class WindowSet:
    """One layer's static buffers and its two recorded loops (the module docstring)."""

    def __init__(self, key: tuple, steps: int, batch: int, hidden: int, weight_hh: Tensor, acc: torch.dtype,
                 device: torch.device) -> None:
        self.key = key
        self.device = device
        self.gates = torch.empty(steps, batch, 4 * hidden, dtype=acc, device=device)
        self.hs = torch.empty(steps + 1, batch, hidden, dtype=acc, device=device)
        self.cs = torch.empty(steps + 1, batch, hidden, dtype=acc, device=device)
        self.u = torch.empty_like(weight_hh, memory_format=torch.contiguous_format)
        self.dy: Optional[Tensor] = None  # the backward's, made at its first backward
        self.dc: Optional[Tensor] = None
        self.dgates: Optional[Tensor] = None
        self.forward_phase = Phase()
        self.backward_phase = Phase()

    def nbytes(self) -> int:
        """Bytes of this set's buffers (the backward's counted before they are made)."""
        state = self.gates.nbytes + self.hs.nbytes + self.cs.nbytes + self.u.nbytes
        return state + self.gates.nbytes + self.hs[1:].nbytes + self.hs[0].nbytes

    def free(self) -> bool:
        """Whether no window holds this set: nothing but the set refers to the storage of gates, hs or cs."""
        return all(_only_ours(t) for t in (self.gates, self.hs, self.cs))

    def views(self) -> tuple[Tensor, Tensor, Tensor]:
        """(gates, hs, cs) for a window, as new views: each one counts as a user of its storage, so the
        set is held while the window keeps any of them (saved for backward, or as its output y)."""
        return tuple(t.view(t.shape) for t in (self.gates, self.hs, self.cs))  # type: ignore[return-value]

    def forward(self, spec: "KernelSpec", weight_hh: Tensor, mm: Optional[torch.dtype], kernels: "Kernels") -> None:
        """The forward loop on this set's buffers (gates holding x Wᵀ + b, hs[0] and cs[0] the initial
        state), recorded or replayed; U is copied in first."""
        self.u.copy_(weight_hh)
        gates, hs, cs, u, loop = self.gates, self.hs, self.cs, self.u, spec.forward_loop
        self.forward_phase.run(lambda: loop(gates, hs, cs, u, mm, kernels), self.device)

    def backward(self, spec: "KernelSpec", dy: Tensor, dc: Tensor, mm: Optional[torch.dtype],
                 kernels: "Kernels") -> Tensor:
        """The backward loop of the window this set's forward ran (U as it was copied in then: autograd
        forbids changing a saved weight between a window's forward and backward), recorded or replayed:
        dy [T,B,H] and dc_T [B,H] copied in; returns dc_{-1}, a tensor of its own; fills `dgates`."""
        if self.dgates is None:
            self.dy = torch.empty_like(self.hs[1:])
            self.dc = torch.empty_like(self.hs[0])
            self.dgates = torch.empty_like(self.gates)
        self.dy.copy_(dy)
        self.dc.copy_(dc)
        gates, hs, cs, u, d_y, d_c, d_g = self.gates, self.hs, self.cs, self.u, self.dy, self.dc, self.dgates
        loop = spec.backward_loop
        self.backward_phase.run(lambda: loop(gates, hs, cs, d_y, d_c, d_g, u, mm, kernels), self.device)
        return self.dc.clone()


class WindowSets:
    """The process's sets, by key (the module docstring); `SETS` is the one the fast layer uses."""

    def __init__(self) -> None:
        self.by_key: Dict[tuple, List[WindowSet]] = {}

    def take(self, x: Tensor, weight_hh: Tensor, acc: torch.dtype, mm: Optional[torch.dtype],
             kernels: "Kernels", history: bool) -> Optional[WindowSet]:
        """The set a window x [T,B,E] of a layer with weight_hh [4H,H] runs in, or None: it runs without
        graphs (graphs off or failed, a window without autograd history — `history` False, as under
        no_grad —, no set free and `MAX_SETS` made or the next past the memory budget, `_budget`)."""
        if not (kernels.graphs and history) or _FAILURE is not None or _USE_COUNT is None:
            return None
        if x.device.type not in _RECORDERS or (x.device.type != "cuda" and not kernels.force):
            return None
        steps, batch = x.shape[:2]  # x [T,B,E], or [T,B] token ids (the first layer by table)
        hidden = weight_hh.shape[1]
        key = (x.device, steps, batch, hidden, weight_hh.dtype, acc, mm, kernels)
        sets = self.by_key.setdefault(key, [])
        for s in sets:
            if s.free():
                return s
        need = 4 * hidden * batch * steps * acc.itemsize * 2 + 3 * (steps + 1) * batch * hidden * acc.itemsize
        if self.count() >= MAX_SETS or self.nbytes() + need > _budget(x.device):
            return None
        s = WindowSet(key, steps, batch, hidden, weight_hh, acc, x.device)
        sets.append(s)
        return s

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.all())

    def count(self) -> int:
        return sum(len(v) for v in self.by_key.values())

    def all(self) -> List[WindowSet]:
        return [s for v in self.by_key.values() for s in v]

    def clear(self) -> None:
        """Drop every set (their graphs and buffers go when no window holds them)."""
        self.by_key.clear()


SETS = WindowSets()


def _budget(device: torch.device) -> int:
    """Bytes the sets of a device may take: `MAX_SHARE` of a GPU's memory, `CPU_BYTES` on the CPU."""
    if device.type == "cuda":
        return int(MAX_SHARE * torch.cuda.get_device_properties(device).total_memory)
    return CPU_BYTES


def clear() -> None:
    """Drop every set of the process (the bench between shapes; a later window records anew)."""
    SETS.clear()


def probe(device: torch.device, batch: int, hidden: int, kernels: "Kernels") -> Optional[str]:
    """None where a 3-step window of `kernels`' loops at [batch, hidden] captures into a graph on
    `device` and its replay matches the loops run without one; else why not. Every set it makes is
    dropped; a failure here is this probe's answer, not recorded (`choose_kernels` agrees on it). On the
    CPU only with `kernels.force` (the tests: the stand-in replay)."""
    global _FAILURE
    if device.type != "cuda" and not kernels.force:
        return "CUDA graphs need CUDA"
    if _USE_COUNT is None:
        return f"this torch ({torch.__version__}) cannot count a storage's users, which tells a set is free"
    from lstm_dist.model.fast import lstm_layer_fast

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(3, batch, 8, generator=g).to(device)
    w = (torch.randn(4 * hidden, 8, generator=g) * 0.3).to(device).requires_grad_()
    u = (torch.randn(4 * hidden, hidden, generator=g) * hidden ** -0.5).to(device).requires_grad_()
    b = torch.zeros(4 * hidden, device=device, requires_grad=True)
    h0 = torch.zeros(batch, hidden, device=device)
    saved, sets = _FAILURE, SETS.by_key
    SETS.by_key = {}
    try:
        runs = []
        for k in range(WARMUP + 2):  # the last window replays the graph the one before captured
            y, h, c = lstm_layer_fast(x, h0, h0, w, u, b, kernels)
            (y.sum() + c.sum()).backward()
            runs.append(torch.cat([y.detach().flatten(), u.grad.flatten()]))
            u.grad = None
            del y, h, c  # the window's outputs hold its set until then
        if _FAILURE is not None:
            return _FAILURE
        made = SETS.all()
        if not made or made[0].backward_phase.replayed < 2:
            return "no graph was replayed in its probe"
        worst = float((runs[-1] - runs[0]).abs().max())
        if not worst < 1e-3:
            return f"its replayed 3-step probe differs from the same window without a graph by {worst:.3g}"
        return None
    except Exception as exc:  # noqa: BLE001 - anything that stops the probe means: no graphs here
        return f"{type(exc).__name__}: {first_line(exc)}"
    finally:
        _FAILURE = saved
        SETS.by_key = sets
