"""The fast path's matrix products on the CPU, each one's implementation chosen by measurement on the
machine (model.cpu_matmul=auto), not assumed.

Which library is fastest for a product depends on the CPU, not only the shape: on one Intel machine MKL's
packed GEMM won the per-step product; on an AMD EPYC, oneDNN's inner product (what `nn.LSTM` runs on
the CPU) was 1.2-2x faster than MKL at hidden 512-1024 (docs/cpu_matmul.md has the figures). So every
fp32 product of a CPU window goes through one of these sites, each with its implementation:

    site      product (per layer)                       when
    step_fwd  out = gates_t + h_{t-1} Uᵀ   [B,H]·[H,4H]   every time step (U fixed for the window)
    step_bwd  out = dy_t + dgates_{t+1} U  [B,4H]·[4H,H]  every reverse step
    input     gates = [X | 1] [W | b]ᵀ     [TB,E+1]·[E+1,4H]   once per window
    grad_x    dX = dgates W                [TB,4H]·[4H,E]      once per window
    grad_w    [dW | db]ᵀ = [X | 1]ᵀ dgates [E+1,TB]·[TB,4H]    once per window
    grad_u    dU = dgatesᵀ H               [4H,TB]·[TB,H]      once per window

The four fixed-weight sites choose among (`IMPLS`), all computing out = add + x M with M fixed for the
window:

    blas           torch.addmm / mm: the BLAS torch was built with (MKL's sgemm in the x86 wheels)
    mkl_packed     MKL's packed-weight GEMM (torch.ops.mkl._mkl_linear), M packed once per window
    onednn         oneDNN's inner product (torch.ops.mkldnn._linear_pointwise) on Mᵀ laid out once
    onednn_packed  the same on Mᵀ reordered once per window into oneDNN's blocked layout

and the weight gradients (grad_w, grad_u: both operands change every window, so nothing is packed, and
oneDNN's inner product would take them only through transposed copies of the window's activations,
measured slower than the product itself) between the two operand orders of BLAS's product (`ORDERS`):

    blas           Aᵀ B as written
    blas_t         (Bᵀ A)ᵀ, handed on as a transposed view

The choice (`choose`): for the run's shapes (batch, bptt, embedding, hidden, threads), every candidate
of every site is timed on random data, called in turn, each one's fastest of a few calls (the
per-window sites at up to `MEASURE_ROWS` rows; a packed candidate pays its packing once per window: per
step at step sites, whole at the others), in 0.1-2 s on 2 cores over bench's grid;
cached in a file per machine (CPU model, family, flags), torch version, threads and shape, so a
machine measures once. Every rank measures, the times are gathered, and every rank takes, per site,
the candidate whose slowest rank is fastest, BLAS's product as written unless that is at least
`MARGIN` (3%) faster (ranks on different CPUs agree on one, as for the kernel table's entries). The choice is saved in checkpoints with the machine it was made on (`record`), and
a resume on the same machine reuses it (bit-identical continuation); on another machine the new
choice stands and one line says the numbers differ by rounding (`resumed`). `model.cpu_matmul`
forces one implementation for every site it applies to (A/B figures: `bench --cpu-matmul`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from lstm_dist.common.atomic import atomic_write_text

IMPLS = ("blas", "mkl_packed", "onednn", "onednn_packed")
ORDERS = ("blas", "blas_t")  # the weight gradients' candidates: Aᵀ B as written, or (Bᵀ A)ᵀ
SITES = ("step_fwd", "step_bwd", "input", "grad_x", "grad_w", "grad_u")
SITE_IMPLS = {"step_fwd": IMPLS, "step_bwd": IMPLS, "input": IMPLS, "grad_x": IMPLS, "grad_w": ORDERS, "grad_u": ORDERS}
MARGIN = 1.03  # another candidate replaces BLAS's product only when at least 3% faster on the slowest rank
MEASURE_ROWS = 512  # rows of a per-window product when it is measured (its time per row is what matters)
FORMAT = 3  # of the cache file's entries (2: fastest of calls in turn, up to 512 rows; 3: a packing's time
# no longer scaled up with the rows, as 2 did)


@dataclass(frozen=True)
class CpuProducts:
    """The implementation of each site (`IMPLS`), as `choose` made it; `blas` everywhere by default
    (what runs on CUDA, under autocast, and where nothing was chosen)."""

    step_fwd: str = "blas"
    step_bwd: str = "blas"
    input: str = "blas"
    grad_x: str = "blas"
    grad_w: str = "blas"
    grad_u: str = "blas"

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) not in SITE_IMPLS[f.name]:
                raise ValueError(f"no matrix product named {getattr(self, f.name)!r} for {f.name}; "
                                 f"the implementations are {', '.join(SITE_IMPLS[f.name])}")

    def as_dict(self) -> Dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        """One phrase: "oneDNN packed products" where every site agrees, else site=impl pairs."""
        impls = set(self.as_dict().values())
        if len(impls) == 1:
            return f"{impls.pop()} products"
        return "products " + " ".join(f"{k}={v}" for k, v in self.as_dict().items())


def usable(impl: str) -> bool:
    """Whether this torch has `impl` (MKL's and oneDNN's ops are in torch's x86 CPU builds)."""
    try:
        if impl == "mkl_packed":
            return bool(torch._C.has_mkl) and hasattr(torch.ops.mkl, "_mkl_linear")
        if impl in ("onednn", "onednn_packed"):
            return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False
    return True


# ---------------------------------------------------------------------------- running a product


class Linear:
    """out = add + x M (or x M where add is None) for a right operand M [K,N] fixed while this object
    lives, by one implementation (`IMPLS`); M is packed (or laid out as Mᵀ) once, here. `blas` uses M as
    it is given (strides included: a transposed view is read transposed). For the C++ loops,
    `cpp_args()` gives what their product takes. Raises ValueError for an unknown implementation."""

    def __init__(self, impl: str, m: Tensor, rows: int) -> None:
        if impl not in IMPLS:
            raise ValueError(f"no matrix product named {impl!r}; the implementations are {', '.join(IMPLS)}")
        self.impl, self.m = impl, m
        self.w = None if impl == "blas" else m.t().contiguous()  # the linear layers' weight: Mᵀ [N,K]
        if impl == "mkl_packed":
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.w, rows)
        elif impl == "onednn_packed":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.w, rows)

    def __call__(self, x: Tensor, add: Optional[Tensor], out: Optional[Tensor]) -> Tensor:
        """add + x M (x M where add is None), written into `out` where given, else a new tensor."""
        impl = self.impl
        if impl == "blas":
            if add is None:
                return torch.mm(x, self.m) if out is None else torch.mm(x, self.m, out=out)
            return torch.addmm(add, x, self.m) if out is None else torch.addmm(add, x, self.m, out=out)
        if impl == "mkl_packed":
            y = torch.ops.mkl._mkl_linear(x, self.packed, self.w, None, x.shape[0])
        else:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed if impl == "onednn_packed" else self.w, None,
                                                   "none", [], "")
        if add is None:
            return y if out is None else out.copy_(y)
        return torch.add(add, y) if out is None else torch.add(add, y, out=out)

    def cpp_args(self) -> Tuple[int, Optional[Tensor], Optional[Tensor]]:
        """(which product the C++ loops run: 0 addmm on M, 1 MKL packed, 2 oneDNN; the weight it takes
        (packed, or Mᵀ for plain oneDNN); Mᵀ itself, which MKL's packed GEMM also needs)."""
        if self.impl == "blas":
            return 0, None, None
        if self.impl == "mkl_packed":
            return 1, self.packed, self.w
        return 2, self.packed if self.impl == "onednn_packed" else self.w, None


def linear(impl: str, m: Tensor, rows: int) -> Linear:
    """`Linear(impl, m, rows)` where `impl` applies (fp32 on the CPU), else the BLAS product (CUDA, other
    dtypes, autocast's products), as before this choice existed."""
    if m.device.type != "cpu" or m.dtype != torch.float32:
        impl = "blas"
    return Linear(impl, m, rows)


# ---------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Shape:
    """A site's product as the fast path runs it: add + x M with x [rows, k] and M [k, n]."""

    rows: int
    k: int
    n: int
    uses: int  # products per window that one packing of M serves
    contiguous: bool  # whether M is contiguous there (else a transposed view)
    adds: bool  # whether it adds into an existing tensor (the step's gates or dy) in place
    into: bool  # whether it writes into a given buffer (else it makes a new tensor)


def site_shapes(batch: int, bptt: int, embedding: int, hidden: int, layers: int) -> Dict[str, Shape]:
    # (for grad_w and grad_u, k and n are the widths of A and B in Aᵀ B, both [rows, ·])
    """Each site's product at a run's shapes: the step sites per time step (rows = batch, a packing
    serves bptt calls, M a contiguous copy of U or Uᵀ, added into the gates or dy in place); the others
    per window, at the widest layer's input (embedding + 1 for layer 0, hidden + 1 above it): the input's
    M is [W | b]ᵀ, a transposed view, written into the gates buffer; grad_x's is W itself, a new tensor."""
    width = max(embedding, hidden if layers > 1 else embedding)
    rows = batch * bptt
    return {"step_fwd": Shape(batch, hidden, 4 * hidden, bptt, True, True, True),
            "step_bwd": Shape(batch, 4 * hidden, hidden, bptt, True, True, True),
            "input": Shape(rows, width + 1, 4 * hidden, 1, False, False, True),
            "grad_x": Shape(rows, 4 * hidden, width, 1, True, False, False),
            "grad_w": Shape(rows, width + 1, 4 * hidden, 1, True, False, False),
            "grad_u": Shape(rows, 4 * hidden, hidden, 1, True, False, False)}


def measure_orders(shape: Shape, rounds: int = 3) -> Dict[str, float]:
    """Seconds of Aᵀ B (A [rows, k], B [rows, n]) in each operand order (`ORDERS`), on random data: each
    one's fastest of `rounds` calls in turn, at up to MEASURE_ROWS rows, scaled back up."""
    m = min(shape.rows, MEASURE_ROWS)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, shape.k, generator=g), torch.randn(m, shape.n, generator=g)
    calls = {"blas": lambda: torch.mm(a.t(), b), "blas_t": lambda: torch.mm(b.t(), a).t()}
    best = {order: float("inf") for order in calls}
    for fn in calls.values():
        fn()
    for _ in range(rounds):
        for order, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            best[order] = min(best[order], time.perf_counter() - t0)
    return {order: best[order] * shape.rows / m for order in calls}


def transposed_product(order: str, a: Tensor, b: Tensor) -> Tensor:
    """Aᵀ B by `order` (`ORDERS`): mm(Aᵀ, B), or mm(Bᵀ, A) handed on as its transposed view."""
    return torch.mm(b.t(), a).t() if order == "blas_t" else torch.mm(a.t(), b)


def measure(shape: Shape, impls=IMPLS, rounds: Optional[int] = None) -> Dict[str, float]:
    """Seconds per product of each usable implementation at a site's shape (`site_shapes`), on random
    data: the candidates called in turn, `rounds` times (5 for a step site, 3 for a per-window one), each
    one's fastest call (the least disturbed by the rest of the machine), the per-window sites at up to
    MEASURE_ROWS rows with the time scaled back up, and a packing's own time spread over its uses.
    Draws from its own generator, not torch's."""
    m = min(shape.rows, MEASURE_ROWS)
    k, n = shape.k, shape.n
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    mat = (torch.randn(k, n, generator=g) * k ** -0.5 if shape.contiguous
           else (torch.randn(n, k, generator=g) * k ** -0.5).t())
    add = torch.randn(m, n, generator=g) if shape.adds else None
    out = torch.empty(m, n) if shape.into else None
    calls: Dict[str, Callable[[], object]] = {}
    pack_s: Dict[str, float] = {}
    for impl in impls:
        if not usable(impl):
            continue
        try:
            t0 = time.perf_counter()
            lin = Linear(impl, mat, m)
            pack_s[impl] = time.perf_counter() - t0 if impl != "blas" else 0.0
            lin(x, add, out)  # the first call: allocations, a library's first-use set-up
        except (RuntimeError, TypeError):  # an op this build lacks or refuses: not a candidate
            continue
        calls[impl] = (lambda lin=lin: lin(x, add, out))
    best = {impl: float("inf") for impl in calls}
    for _ in range(rounds or (5 if shape.uses > 1 else 3)):
        for impl, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            best[impl] = min(best[impl], time.perf_counter() - t0)
    return {impl: site_seconds(best[impl], pack_s[impl], shape, m) for impl in calls}


def site_seconds(call_s: float, pack_s: float, shape: Shape, measured_rows: int) -> float:
    """Seconds per product at `shape` from one measured call of `measured_rows` rows (`call_s`) and the
    packing of M (`pack_s`, 0 for none): the call scaled up to the shape's rows, the packing spread over
    the products it serves (`shape.uses`) and not scaled, as it is of M, whatever the rows. (Cache format
    2 scaled the packing too: at 4,096 rows, 8x its cost, and oneDNN's grad_x never won where it was
    faster.)"""
    return call_s * shape.rows / measured_rows + pack_s / shape.uses


def machine() -> str:
    """This machine in one line: CPU model, family/model/stepping and a hash of its flags (Linux), or
    what `platform` knows elsewhere."""
    info: Dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "stepping", "flags") and key not in info:
                info[key] = value.strip()
            if len(info) == 5:
                break
    except OSError:
        pass
    if not info:
        return f"{platform.machine()} {platform.processor()}".strip()
    flags = hashlib.sha1(info.get("flags", "").encode()).hexdigest()[:8]
    return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')} "
            f"stepping {info.get('stepping', '?')}, flags {flags})")


def _cache_path() -> Path:
    root = os.environ.get("LSTM_DIST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lstm_dist")
    return Path(root) / "cpu_matmul.json"


def _cache_key(site: str, shape: Shape, threads: int) -> str:
    return json.dumps([FORMAT, machine(), str(torch.__version__), threads, site, list(dataclasses.astuple(shape))])


def cached_times(site: str, shape: Shape, threads: int) -> Dict[str, float]:
    """The times of `measure` for this machine, torch, thread count and shape: from the cache file where
    they are there, else measured now and added to it (written atomically; an unwritable cache is only
    not kept)."""
    path, key = _cache_path(), _cache_key(site, shape, threads)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache and isinstance(cache[key], dict):
        return {k: float(v) for k, v in cache[key].items() if k in SITE_IMPLS[site]}
    times = measure_orders(shape) if SITE_IMPLS[site] is ORDERS else measure(shape)
    try:  # re-read: another process may have added its own shapes meanwhile
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache[key] = times
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cache, indent=0, sort_keys=True))
    except OSError:
        pass
    return times


def choose(batch: int, bptt: int, embedding: int, hidden: int, layers: int, forced: str,
           gather: Callable[[object], list]) -> CpuProducts:
    """The products of a CPU run at these shapes (module docstring): `forced` (model.cpu_matmul) one of
    IMPLS for every site, or `auto`: per site the candidate whose slowest rank is fastest, from every
    rank's times (`gather`: this rank's object -> every rank's, `common.distributed.all_objects`; a
    collective). Raises ValueError for a `forced` that is neither."""
    if forced != "auto":
        if forced not in IMPLS:
            raise ValueError(f"model.cpu_matmul: no matrix product named {forced!r}")
        return CpuProducts(**{site: forced if usable(forced) and forced in SITE_IMPLS[site] else "blas"
                              for site in SITES})
    threads = torch.get_num_threads()
    mine = {site: cached_times(site, shape, threads)
            for site, shape in site_shapes(batch, bptt, embedding, hidden, layers).items()}
    every = gather(mine)
    chosen = {}
    for site in SITES:
        common = set.intersection(*(set(times[site]) for times in every)) or {"blas"}
        slowest = {impl: max(times[site][impl] for times in every) for impl in common}
        best = min(sorted(common), key=slowest.get)
        # BLAS's product as written stays unless another is clearly faster: a near tie is noise, and
        # flipping on it would change the numbers (by rounding) for nothing
        chosen[site] = "blas" if "blas" in slowest and slowest["blas"] <= MARGIN * slowest[best] else best
    return CpuProducts(**chosen)


def record(products: CpuProducts) -> dict:
    """What a checkpoint keeps of the choice: the machine it was made on and each site's implementation."""
    # plain str and int only: a checkpoint loads with weights_only (torch.__version__ is a str subclass)
    return {"machine": machine(), "torch": str(torch.__version__), "threads": int(torch.get_num_threads()),
            **products.as_dict()}


def resumed(saved: Optional[dict], current: CpuProducts, say: Callable[[str], None],
            agree: Callable[[bool], list]) -> CpuProducts:
    """The products a resumed run uses: the checkpoint's choice where every rank is on the machine, torch
    and thread count it was made with (so the run continues bit for bit), else `current`, with one line
    (`say`, rank 0's) where the two differ: the numbers then differ from an uninterrupted run's by
    rounding. `agree`: this rank's answer -> every rank's (`common.distributed.all_objects`; a
    collective, called on every rank once `saved` holds a choice)."""
    if not saved:
        return current
    try:
        theirs = CpuProducts(**{site: saved[site] for site in SITES})
    except (KeyError, ValueError, TypeError):
        return current
    here = (saved.get("machine") == machine() and saved.get("torch") == str(torch.__version__)
            and saved.get("threads") == torch.get_num_threads()
            and all(usable(impl) for impl in theirs.as_dict().values()))
    if all(agree(here)):
        return theirs
    if theirs != current:
        say(f"note: the checkpoint's CPU matrix products ({theirs.describe()}) were chosen on "
            f"{saved.get('machine')} with torch {saved.get('torch')} and {saved.get('threads')} threads; this run "
            f"measured {current.describe()} here, so its numbers differ from an uninterrupted run's by rounding")
    return current
