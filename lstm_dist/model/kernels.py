"""Which LSTM kernels run: the table of the paths (`KERNELS`), the object that names one (`Kernels`), and
the one place that chooses it from the config and the machine, agreed by every rank (`choose_kernels`).

Every path computes the equations of `lstm_dist.model.cell`; `tests/test_model.py` and
`tests/test_fast_path.py` run each entry of the table (values and every gradient over carried windows,
against the reference and torch.nn.LSTM), skipping with the reason an entry this machine cannot run.

    entry       model.impl  devices    what runs per layer and window
    reference   reference   cpu, cuda  `cell.lstm_layer_reference`: the equations step by step under autograd
    triton      fast        cuda       `fast.lstm_layer_fast` with each time step one Triton kernel per
                                       direction (model.triton, opt-in)
    compiled    fast        cuda       `fast.lstm_layer_fast` with torch.compile'd pointwise steps
    cpp_loops   fast        cpu        `fast.lstm_layer_fast` with both time loops in C++ (fp32, AVX2, built once)
    eager       fast        cpu, cuda  `fast.lstm_layer_fast` with in-place eager steps: the definition

CUDA graphs (`Kernels.graphs`, model.cuda_graphs) are not an entry but a way to run any entry's loops:
each layer's forward and backward loop recorded once and replayed every training window
(`lstm_dist.model.graphs`), with whichever entry was chosen; a 3-step probe window on every rank at
the training shapes decides, together, as for an entry.

A new path is one entry here (its loops with the signatures of `lstm_dist.model.loops`, a `why_not`
where it may not run): the tests take every entry as a parameter. A window an entry does not take (another device, dtype, or autocast's products where the
entry has none) runs the eager loops (`Kernels.for_window`): e.g. the C++ loops under CPU autocast.

The choice (`choose_kernels`) is made once per process, by every rank together: for the config's
`model.impl`, the first entry in table order that the config asks for (`KernelSpec.wanted`), that is for
this device, and that every rank can run. What an entry needs is probed on each rank (a build, a
compile at the training shapes), the answers gathered, and if any rank cannot, every rank falls back to
the next entry together (one rank on slower loops would make every step of the job wait for it), rank 0
saying which rank and why. `LSTM_DIST_CPU_LOOPS=0` in the environment switches the C++ loops off (read
there, once per choice; nothing is built). `Kernels` is then handed to the model
(`CharLSTM(..., kernels=...)`), whose layers pass it down; nothing else selects a path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from lstm_dist.common import faults
from lstm_dist.common.distributed import all_objects
from lstm_dist.config import ModelConfig, check_setting
from lstm_dist.model import cpu_loops, graphs, loops, products, triton_loops
from lstm_dist.model.cell import lstm_layer_reference
from lstm_dist.model.fast import lstm_layer_fast
from lstm_dist.model.products import CpuProducts

NOTE_BF16_ON_CPU = "note: train.precision=bf16 applies on CUDA only; this CPU run computes in fp32"
NOTE_GRAPHS_ON_CPU = "note: model.cuda_graphs=true applies on CUDA only; this CPU run records no graphs"


@dataclass(frozen=True)
class KernelSpec:
    """One path through a layer: what it implements, where it runs, and how to ask whether it can."""

    impl: str  # the model.impl value it implements (`fast` or `reference`)
    phrase: str  # what `Kernels.describe` says
    devices: tuple[str, ...]  # device types it is chosen for (and runs on, unless `Kernels.force`)
    dtypes: tuple[torch.dtype, ...]  # state dtypes it computes in; another runs the eager loops
    autocast_products: bool  # whether it takes windows whose matrix products run in autocast's dtype
    layer: Callable  # (x, h0, c0, W, U, b, kernels) -> (y, h_T, c_T), as `fast.lstm_layer_fast`
    forward_loop: Optional[Callable] = None  # the fast layer's loops (`lstm_dist.model.loops`); None: no fast layer
    backward_loop: Optional[Callable] = None
    wanted: Callable[[ModelConfig, torch.device], bool] = lambda model_cfg, device: True  # asked for by the config
    why_not: Optional[Callable[[torch.device, int, int], Optional[str]]] = None  # (device, batch, hidden) -> why it cannot run here
    fallback: str = ""  # rank 0's warning when a rank cannot: .format(rank=, why=)
    fault: str = ""  # the LSTM_DIST_FAULT point that makes a rank report it cannot (lstm_dist.common.faults)
    env_off: str = ""  # an environment variable that, set to 0, makes a rank report it cannot


def _reference_layer(x, h0, c0, weight_ih, weight_hh, bias, kernels):
    return lstm_layer_reference(x, h0, c0, weight_ih, weight_hh, bias)


def _cpp_why_not(device: torch.device, batch: int, hidden: int) -> Optional[str]:
    """None when the C++ loops are built (or load) in this process, else why not (`cpu_loops.failure`)."""
    return None if cpu_loops.get() is not None else cpu_loops.failure()


def probe_compile(device: torch.device, batch: int, hidden: int) -> Optional[str]:
    """Compile the pointwise steps now, at the training shapes ([batch, 4·hidden]), on a 2-step window on
    `device`: None if they work, else why they failed (the warning `loops` gave). Draws no random number."""
    leaf = lambda *shape: torch.zeros(*shape, device=device, requires_grad=True)  # noqa: E731
    x, w, u, b = leaf(2, batch, 1), leaf(4 * hidden, 1), leaf(4 * hidden, hidden), leaf(4 * hidden)
    h0 = torch.zeros(batch, hidden, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, _, c = lstm_layer_fast(x, h0, h0, w, u, b, Kernels("compiled", force=True))
        (y.sum() + c.sum()).backward()
    if loops.compile_available():
        return None
    return next((str(w.message) for w in caught if "LSTM pointwise" in str(w.message)), "torch.compile failed")


_ANY_FLOAT = (torch.float32, torch.float64)

# In choice order within each model.impl (see the module docstring).
KERNELS: dict[str, KernelSpec] = {
    "reference": KernelSpec(
        impl="reference", phrase="reference autograd steps", devices=("cpu", "cuda"), dtypes=_ANY_FLOAT,
        autocast_products=True, layer=_reference_layer),
    "triton": KernelSpec(
        # Each time step one Triton kernel per layer and direction (the recurrent product with the cell
        # update, or its gradient, as the epilogue). Opt-in (model.triton) until a GPU has measured it.
        impl="fast", phrase="Triton step kernels", devices=("cuda",), dtypes=(torch.float32,),
        autocast_products=True, layer=lstm_layer_fast, forward_loop=triton_loops.triton_forward,
        backward_loop=triton_loops.triton_backward, wanted=lambda model_cfg, device: model_cfg.triton,
        why_not=triton_loops.available,
        fallback="the Triton LSTM step cannot run on rank {rank} ({why}); every rank runs the next kernels in the table",
        fault="triton-fails"),
    "compiled": KernelSpec(
        # On CUDA each eager op of a step is a kernel launch of its own; on the CPU these steps measured
        # slower than the eager ones (inductor's 1-ulp exp/tanh 2-3x slower than ATen's at these sizes,
        # ~40 µs a compiled call per step), so it is chosen for CUDA only. Asked about whenever
        # model.compile is set: on the CPU nothing is compiled, so only an injected fault fails it there.
        impl="fast", phrase="compiled CUDA steps", devices=("cuda",), dtypes=_ANY_FLOAT, autocast_products=True,
        layer=lstm_layer_fast, forward_loop=loops.compiled_forward, backward_loop=loops.compiled_backward,
        wanted=lambda model_cfg, device: model_cfg.compile, why_not=probe_compile,
        fallback="torch.compile of the LSTM step failed on rank {rank} ({why}); every rank runs the eager step",
        fault="compile-fails"),
    "cpp_loops": KernelSpec(
        impl="fast", phrase="C++ CPU loops", devices=("cpu",), dtypes=(torch.float32,), autocast_products=False,
        layer=lstm_layer_fast, forward_loop=loops.cpp_forward, backward_loop=loops.cpp_backward,
        wanted=lambda model_cfg, device: device.type == "cpu", why_not=_cpp_why_not,
        fallback="the C++ LSTM loops are not available on rank {rank} ({why}); every rank runs the eager loops "
                 "(slower on the CPU, the same numbers to ~5e-7)",
        fault="cpu-loops-fail", env_off="LSTM_DIST_CPU_LOOPS"),
    "eager": KernelSpec(
        impl="fast", phrase="eager steps", devices=("cpu", "cuda"), dtypes=_ANY_FLOAT, autocast_products=True,
        layer=lstm_layer_fast, forward_loop=loops.eager_forward, backward_loop=loops.eager_backward),
}


TABLE_ROWS_PER_TOKEN = 4  # a window's first layer uses the input table from this many rows per vocabulary entry


@dataclass(frozen=True)
class Kernels:
    """Which kernels the layers run: made by `choose_kernels` (or directly, in tests and tools).

    name: the `KERNELS` entry; bf16: the training step runs under bf16 autocast on CUDA, so the matrix
    products run in bf16 (the state and the cell update stay fp32); products: the implementation of each
    fp32 CPU matrix product of the fast path (`lstm_dist.model.products.CpuProducts`: BLAS, MKL packed,
    oneDNN; measured on the machine by `choose_kernels`; BLAS everywhere by default, ~1e-6 apart);
    force: run the entry's loops on any device, not only its `devices` (how the tests run the compiled
    CUDA steps on the CPU); tf32: fp32 products run in TF32 (CUDA only; `choose_kernels` sets torch's
    flags to match); graphs: each layer's two time loops are recorded as CUDA graphs and replayed
    every training window (`lstm_dist.model.graphs`; on the CPU only with `force`, as the tests run it);
    input_table: the fast path's first layer takes its input gates from a [vocab, 4H] table (`table_input`).
    Raises ValueError for a name not in the table.
    """

    name: str = "eager"
    bf16: bool = False
    products: CpuProducts = CpuProducts()
    force: bool = False
    tf32: bool = False
    graphs: bool = False
    input_table: bool = False

    def __post_init__(self) -> None:
        if self.name not in KERNELS:
            raise ValueError(f"no LSTM kernels named {self.name!r}; the table has {', '.join(KERNELS)}")

    @property
    def spec(self) -> KernelSpec:
        return KERNELS[self.name]

    def for_window(self, device_type: str, dtype: torch.dtype, autocast_products: bool) -> KernelSpec:
        """The entry whose time loops run a window on `device_type` with state `dtype` (and matrix
        products in autocast's dtype when `autocast_products`): this one where it takes the window, else eager."""
        spec = self.spec
        if spec.forward_loop is None:
            raise ValueError(f"the {self.name} kernels have no time loops (only the fast layer has)")
        takes = ((self.force or device_type in spec.devices) and dtype in spec.dtypes
                 and (spec.autocast_products or not autocast_products))
        return spec if takes else KERNELS["eager"]

    def table_input(self, vocab: int, rows: int) -> bool:
        """Whether the first layer of a window of `rows` = T·B tokens over a `vocab`-token vocabulary takes
        its input gates from a table: the embedding followed by the first layer's input weights is one
        [vocab, 4H] table, E·Wᵀ + b, so each row's gates are a lookup, and the window's three products
        over T·B rows of width E (input, dX, dW) become three over vocab rows (the table, dE, dW) plus a
        scatter of dgates into the table's gradient (`fast.LSTMWindow`). The same numbers to rounding.
        Where `input_table` (the CPU's fast path, `choose_kernels`) and the window has at least
        `TABLE_ROWS_PER_TOKEN` rows per vocabulary entry (else the table costs more than it saves)."""
        return self.input_table and rows >= TABLE_ROWS_PER_TOKEN * vocab

    def compiles(self) -> bool:
        """Whether this entry's loops compile pointwise steps with torch.compile (the compiled entry)."""
        spec = self.spec
        return spec.forward_loop is loops.compiled_forward or spec.backward_loop is loops.compiled_backward

    def runs_compiled(self) -> bool:
        """Whether the pointwise steps run compiled: an entry that compiles them, and compiling has not
        failed in this process (where it fails, the same steps run uncompiled from then on)."""
        return self.compiles() and loops.compile_available()

    def runs_graphs(self) -> bool:
        """Whether the time loops run in CUDA graphs: `graphs`, and no capture has failed in this process
        (where one fails, the same loops run without graphs from then on)."""
        return self.graphs and graphs.available()

    def precision(self) -> str:
        """The arithmetic in a word or three: "bf16", "fp32 (TF32 products)" or "fp32"."""
        return "bf16" if self.bf16 else ("fp32 (TF32 products)" if self.tf32 else "fp32")

    def describe(self) -> str:
        """A short phrase for the log: the precision and the path, e.g. "fp32, C++ CPU loops" or
        "bf16, compiled CUDA steps in CUDA graphs", ", input by table" where `input_table` (the CPU's matrix
        products: `products.describe()`)."""
        return (f"{self.precision()}, {self.spec.phrase}" + (" in CUDA graphs" if self.graphs else "")
                + (", input by table" if self.input_table else ""))

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the training step runs its forward in: bf16 autocast on CUDA when `bf16`, else none."""
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _every_rank_can(spec: KernelSpec, device: torch.device, batch: int, hidden: int,
                    say: Callable[[str], None]) -> bool:
    """Whether every rank can run `spec` (a collective where the entry probes anything: every rank calls
    it with the same entry); if one cannot, `say` gets the entry's warning naming the first such rank."""
    if spec.why_not is None and not spec.fault and not spec.env_off:
        return True
    if spec.fault and faults.armed(spec.fault, 0):
        why = f"injected by LSTM_DIST_FAULT={spec.fault}"
    elif spec.env_off and os.environ.get(spec.env_off, "1") == "0":
        why = f"{spec.env_off}=0"
    elif spec.why_not is not None and device.type in spec.devices:
        why = spec.why_not(device, batch, hidden)
    else:
        why = None
    return _agreed(why, lambda rank, w: "warning: " + spec.fallback.format(rank=rank, why=w), say)


def _agreed(why: Optional[str], warning: Callable[[int, str], str], say: Callable[[str], None]) -> bool:
    """Whether no rank has a reason `why` it cannot (a collective: every rank's answer is gathered);
    where one has, `say` gets `warning(first such rank, its reason)`."""
    failed = [(rank, w) for rank, w in enumerate(all_objects(why)) if w is not None]
    if failed:
        say(warning(*failed[0]))
        return False
    return True


def _cpu_products(model_cfg: ModelConfig, device: torch.device, batch: int, bptt: Optional[int]) -> CpuProducts:
    """The CPU's matrix products for a fast model (`products.choose`; BLAS's on CUDA and for the
    reference path, whose products are autograd's own; measured only where `bptt` is known)."""
    if device.type != "cpu" or model_cfg.impl != "fast":
        return CpuProducts()
    forced = model_cfg.cpu_matmul
    if forced == "auto" and bptt is None:
        return CpuProducts()
    return products.choose(batch, bptt or 1, model_cfg.embedding, model_cfg.hidden, model_cfg.layers, forced,
                           all_objects)


def _every_rank_graphs(kernels: Kernels, device: torch.device, batch: int, hidden: int,
                       say: Callable[[str], None]) -> bool:
    """Whether every rank can record `kernels`' time loops as CUDA graphs (`graphs.probe`, a 3-step
    window at the training shapes); if one cannot, `say` gets one warning naming the first such rank.
    A collective, as `_every_rank_can`."""
    if faults.armed("graphs-fail", 0):
        why = "injected by LSTM_DIST_FAULT=graphs-fail"
    else:
        why = graphs.probe(device, batch, hidden, dataclasses.replace(kernels, graphs=True))
    return _agreed(why, lambda rank, w: f"warning: CUDA graphs of the LSTM time loops cannot run on rank {rank} "
                                        f"({w}); every rank runs the same loops without graphs ({kernels.spec.phrase})",
                   say)


def set_tf32(enabled: bool) -> None:
    """TF32 for this process's fp32 matrix products on CUDA, torch's (`torch.backends.cuda.matmul`)
    and cuDNN's (`torch.backends.cudnn`), both on or both off: the setting is the same for our products
    and for the `nn.LSTM` the benches compare with."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def choose_kernels(model_cfg: ModelConfig, precision: str, device: torch.device, *, batch: int,
                   say: Callable[[str], None], tf32: bool = True, bptt: Optional[int] = None,
                   vocab: Optional[int] = None) -> Kernels:
    """The kernels every rank runs, chosen from the config and the machine (the module docstring).

    model_cfg: the run's `ModelConfig` (impl, compile, hidden are read); precision: `train.precision`
    (`auto` and `bf16` mean bf16 autocast on CUDA; on the CPU everything is fp32, and `bf16` there is
    said in one note line); device: this rank's; batch: streams per rank (the shape the compiled steps
    are probed at). `say` gets rank 0's lines (a fallback warning, the note); other ranks say nothing.
    tf32: `train.tf32`; on CUDA it sets the process's TF32 flags (`set_tf32`), on the CPU it means nothing.
    bptt: the training window; on the CPU, with `model.cpu_matmul=auto`, each fp32 matrix product's
    implementation is measured at (batch, bptt) and the model's sizes (`products.choose`: cached per
    machine, agreed by every rank); None (inference) measures nothing and runs BLAS's unless forced.
    vocab: the vocabulary's size; with bptt, on the CPU's fast path, the first layer takes its input by
    table where a window has at least `TABLE_ROWS_PER_TOKEN` rows per token (`Kernels.table_input`).
    A collective: every rank calls it, at the same point (it gathers what each rank could run; with no
    process group it is a world of one). It may build the C++ loops (~30 s, once per version) or
    compile the pointwise steps; it draws no random number. Raises UserError for a `model.impl` or
    `precision` that is not one of the config's choices, RuntimeError where no entry runs on `device`.
    """
    check_setting("train.precision", precision)
    impl = check_setting("model.impl", model_cfg.impl)
    tell = say if _rank() == 0 else (lambda line: None)
    bf16 = device.type == "cuda" and precision in ("auto", "bf16")
    tf32 = device.type == "cuda" and tf32
    if device.type == "cuda":
        set_tf32(tf32)
    if precision == "bf16" and not bf16:
        tell(NOTE_BF16_ON_CPU)
    graphed = model_cfg.cuda_graphs and impl == "fast"
    if graphed and device.type != "cuda":
        tell(NOTE_GRAPHS_ON_CPU)
    for name, spec in KERNELS.items():
        if spec.impl != impl or not spec.wanted(model_cfg, device):
            continue
        if _every_rank_can(spec, device, batch, model_cfg.hidden, tell) and device.type in spec.devices:
            # the first layer's input by table lookup on the CPU's fast path (`Kernels.table_input`); not on
            # CUDA until a GPU has measured its scatter of dgates (atomics into vocab rows) against the products
            table = (impl == "fast" and device.type == "cpu" and vocab is not None and bptt is not None
                     and batch * bptt >= TABLE_ROWS_PER_TOKEN * vocab)
            kernels = Kernels(name, bf16=bf16, tf32=tf32, products=_cpu_products(model_cfg, device, batch, bptt),
                              input_table=table)
            if graphed and device.type == "cuda" and _every_rank_graphs(kernels, device, batch, model_cfg.hidden, tell):
                kernels = dataclasses.replace(kernels, graphs=True)
            return kernels
    raise RuntimeError(f"no LSTM kernels for model.impl={impl} on {device.type}")  # a table without a last resort
