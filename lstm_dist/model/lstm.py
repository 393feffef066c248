"""The LSTM cell from its equations: the reference path and the fast path with a hand-derived backward.

The cell (one layer, one time step; x the input, (h, c) the carried state, ⊙ the elementwise product):

    i  = σ(W_i x + U_i h + b_i)          input gate
    f  = σ(W_f x + U_f h + b_f)          forget gate
    g  = tanh(W_g x + U_g h + b_g)       candidate cell
    o  = σ(W_o x + U_o h + b_o)          output gate
    c' = f ⊙ c + i ⊙ g
    h' = o ⊙ tanh(c')

Weights: one [4H, E] input matrix W, one [4H, H] recurrent matrix U and one [4H] bias per layer, the
gates stacked in the order i, f, g, o (layout and initialisation: `lstm_dist.model`).

Two implementations of a layer over a window of T steps, same parameters and same numbers:

- `lstm_layer_reference`: the equations step by step (`lstm_cell`) under ordinary autograd.
- `lstm_layer_fast` (the default): one `torch.autograd.Function` per layer and window. Forward: the
  input projection of the whole window is one matrix product written into a preallocated gates
  buffer; per step only the recurrent product (added in place) and the pointwise cell update, written
  into preallocated buffers. Backward, derived by hand from the equations above, walking t = T-1 .. 0:

      dh_t  = dy_t + dgates_{t+1} U                    (recurrent product, written in place)
      do    = dh_t ⊙ tanh(c_t)
      dc_t  = dc_{t+1}·f_{t+1} + dh_t ⊙ o ⊙ (1 - tanh²(c_t))
      di = dc_t ⊙ g,  df = dc_t ⊙ c_{t-1},  dg = dc_t ⊙ i
      dgates_t = [di·i(1-i), df·f(1-f), dg·(1-g²), do·o(1-o)]     (through σ and tanh)

  The factors that do not depend on the incoming gradient (σ', tanh', and the products with the
  other gates: g·i(1-i), c_{t-1}·f(1-f), i·(1-g²), tanh(c_t)·o(1-o), o·(1-tanh²(c_t))) are computed
  for the whole window before the loop, so a step is the recurrent product and 6 in-place ops;
  and after the loop the weight gradients as single products over all T·B rows of the window:
  dW = dgates^T X, dU = dgates^T [h_{-1}, …, h_{T-2}], db = Σ dgates, dX = dgates W. Gradients reach
  the initial state too: dh_{-1} = dgates_0 U, dc_{-1} = dc_0 ⊙ f_0.

The pointwise work of a step is written twice per direction, as it must be: a functional form
(`_fwd_pointwise`, `_bwd_pointwise`) that `torch.compile` fuses into one kernel (a small function
with fixed shapes, never the time loop, so compile time does not grow with the window), and the
in-place eager ops of the loops (no allocation per step), used with `compile=False`, where no
compiler works (one warning, then eager), and on CPU (see `compile_steps` for the measurement).

Where the CPU time goes, and what the fast path does about it (numbers: this repo's bench, 2 cores):
- matrix products are ~80% of a window: the input product and the weight gradients are single big
  GEMMs over the window; the recurrent product per step uses MKL's packed-weight GEMM when this torch
  has it (U packed once per window instead of inside every call), else addmm into the gates buffer;
- big buffers (gates, states, dgates: ~190 MB per window at batch 64 / hidden 512) are reused through
  `buffers.BufferPool` instead of being page-faulted in afresh every window (that alone was ~15% of a
  window);
- the bias rides in the input GEMM as a column of ones ([X | 1] [W | b]^T), so neither a broadcast
  copy of the bias over the window nor a separate column sum for db is needed;
- the per-step views of the buffers are made once per pooled buffer (`BufferPool.steps`), not per
  window, and the pointwise update is a few in-place ops (forward 7, backward 6) with no allocation;
  `tests/test_fast_path.py` pins these counts;
- for fp32 on the CPU both loops run in C++ where that builds (`lstm_dist.cpu_loops`,
  `csrc/lstm_loops.cpp`): per step the same recurrent product through ATen and the cell update in
  one vectorised pass over the rows, no Python between steps (a 2 × 256, batch-32 training step:
  ~12% faster). The eager loops above stay the definition and the fallback (`CPU_LOOPS`), and the
  trainer makes every rank use the same loops.

Precision: the recurrent state (h, c), the gates and the cell update are always fp32. Under
`torch.autocast` (e.g. bf16 on CUDA) only the matrix products run in the autocast dtype.

Tensors inside the layers are time-major ([T, B, ·]) so each step's slice is contiguous. The module
around the cell (`LSTMLayer`, `CharLSTM`) is `lstm_dist.model`.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lstm_dist.model import cpu_loops
from lstm_dist.model.buffers import BufferPool
from lstm_dist.common.errors import first_line

State = Tuple[Tensor, Tensor]

# Settings of the fast path, read at each window (tests flip them to cover the other paths here):
COMPILE_ON_CPU = False  # see compile_steps; CUDA always compiles both steps
USE_MKL_PACKED = True  # MKL's packed-weight GEMM for the recurrent product where this torch has it
CPU_LOOPS = True  # the compiled C++ time loops (lstm_dist.cpu_loops) for fp32 on the CPU where they build


# ----------------------------------------------------------------------------------------------
# The reference: the equations, one step at a time, under autograd.
# ----------------------------------------------------------------------------------------------


def cell_update(gates: Tensor, c: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The module docstring's equations from the pre-activations [B,4H] and c [B,H]:
    (i, f, g, o, c', tanh(c')). The reference path, `step()` and the compiled forward step all use it."""
    gi, gf, gg, go = gates.chunk(4, dim=1)
    i = torch.sigmoid(gi)
    f = torch.sigmoid(gf)
    g = torch.tanh(gg)
    o = torch.sigmoid(go)
    c_next = f * c + i * g
    return i, f, g, o, c_next, torch.tanh(c_next)


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor) -> State:
    """One step of the cell: (x [B,E], h [B,H], c [B,H]) -> (h', c')."""
    gates = (F.linear(x, weight_ih) + F.linear(h, weight_hh)).to(c.dtype) + bias.to(c.dtype)
    _, _, _, o, c_next, tanh_c = cell_update(gates, c)
    return o * tanh_c, c_next


def lstm_layer_reference(
    x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """A layer over a window, step by step: x [T,B,E], h0/c0 [B,H] -> (y [T,B,H], h_T, c_T)."""
    h, c = h0, c0
    ys = []
    for t in range(x.shape[0]):
        h, c = lstm_cell(x[t], h, c, weight_ih, weight_hh, bias)
        ys.append(h)
    return torch.stack(ys), h, c


# ----------------------------------------------------------------------------------------------
# The fast layer: whole-window Function with a hand-written backward.
# ----------------------------------------------------------------------------------------------


def _fwd_pointwise(gates: Tensor, c_prev: Tensor, c_out: Tensor, h_out: Tensor) -> None:
    """Step t of the forward, for torch.compile to fuse: gates (pre-activations [B,4H]) become the
    activations; writes c' and h'. The eager form is the in-place ops in `_forward_loop`."""
    i, f, g, o, c, tc = cell_update(gates, c_prev)
    gates.copy_(torch.cat([i, f, g, o], dim=1))
    c_out.copy_(c)
    h_out.copy_(o * tc)



_COMPILED: dict = {}
_COMPILE_FAILED = False


def compile_available() -> bool:
    """False once compiling the pointwise step has failed in this process (then eager is used)."""
    return not _COMPILE_FAILED


def compile_steps(use_compile: bool, device_type: str) -> Tuple[bool, bool]:
    """Whether to run the (forward, backward) pointwise step compiled.

    On CUDA both are (each eager op would be a kernel launch of its own). On CPU neither, measured
    with `python -m lstm_dist.bench` on 2 cores: inductor's CPU kernels compute exp/tanh with 1-ulp
    vector math 2-3x slower than ATen's eager sigmoid_/tanh_ at these sizes, and the backward step,
    6 eager ops once its coefficients are computed for the whole window, lost to the ~40 µs a
    compiled call costs per step (2 x 256, batch 32: 104 ms eager vs 114 ms compiled per window).
    """
    if not use_compile or _COMPILE_FAILED:
        return False, False
    on = device_type != "cpu" or COMPILE_ON_CPU
    return on, on


def _compiled_or_eager(name: str, functional: Callable, eager: Callable[[int], None],
                       args_of: Callable[[int], tuple]) -> Callable[[int], None]:
    """Step t through `functional` compiled (once per process, on first use), or through `eager`
    from the moment compiling fails (no C++ toolchain, no Triton, ...), with one warning."""

    def step(t: int) -> None:
        global _COMPILE_FAILED
        if not _COMPILE_FAILED:
            try:
                if name not in _COMPILED:
                    _COMPILED[name] = torch.compile(functional, dynamic=False, fullgraph=True)
                return _COMPILED[name](*args_of(t))
            except Exception as exc:
                _COMPILE_FAILED = True
                warnings.warn(f"torch.compile of the LSTM pointwise step failed ({type(exc).__name__}: "
                              f"{first_line(exc)}); using eager pointwise ops", RuntimeWarning, stacklevel=2)
        eager(t)

    return step


def probe_compile(batch: int, hidden: int, device: torch.device) -> Optional[str]:
    """Compile the pointwise steps now, at the training shapes ([batch, 4·hidden]), on a 2-step window;
    None if they work or this device runs them eager anyway (`compile_steps`), else why they failed.
    The trainer gathers this from every rank so that all fall back together (one rank running eager
    would make every step of the job wait for it)."""
    if not any(compile_steps(True, device.type)):
        return None
    leaf = lambda *shape: torch.zeros(*shape, device=device, requires_grad=True)  # noqa: E731
    x, w, u, b = leaf(2, batch, 1), leaf(4 * hidden, 1), leaf(4 * hidden, hidden), leaf(4 * hidden)
    h0 = torch.zeros(batch, hidden, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, _, c = lstm_layer_fast(x, h0, h0, w, u, b, use_compile=True)
        (y.sum() + c.sum()).backward()
    if compile_available():
        return None
    return next((str(w.message) for w in caught if "LSTM pointwise" in str(w.message)), "torch.compile failed")


_POOL = BufferPool()


def _lowp_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The matmul dtype autocast asks for on this device, or None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _recurrent_product(weight: Tensor, transposed: bool, batch: int, acc: torch.dtype, mm: Optional[torch.dtype]):
    """The per-step product of the recurrence, as `product(x, add, out)`: out = add + x M with
    M = weight^T (`transposed`: the forward's h U^T) or M = weight (the backward's dgates U).

    Three ways, chosen once per window: MKL's packed-weight GEMM (torch.ops.mkl, what inductor uses
    for fp32 linear on CPU: M packed once per window instead of inside every call) where this torch
    has it; else one addmm; under autocast (`mm`, e.g. bf16) the product in that dtype, added in fp32.
    """
    m = weight.t() if transposed else weight  # [K, N]
    packed = _mkl_packed(m, batch, acc) if mm is None else None
    if packed is not None:
        w_packed, w_lin = packed
        linear = torch.ops.mkl._mkl_linear
        return lambda x, add, out: torch.add(add, linear(x, w_packed, w_lin, None, batch), out=out)
    if mm is None:
        m_acc = m.to(acc).contiguous()
        return lambda x, add, out: torch.addmm(add, x, m_acc, out=out)
    m_low = m.to(mm).contiguous()
    return lambda x, add, out: torch.add(add, torch.mm(x.to(mm), m_low), out=out)


def _mkl_packed(m: Tensor, batch: int, acc: torch.dtype) -> Optional[Tuple[Tensor, Tensor]]:
    """(M packed for MKL's GEMM at this batch, the M^T it was packed from) for out = x M, where this
    torch has MKL's packed GEMM and M is fp32 on the CPU (USE_MKL_PACKED); else None."""
    if not (m.device.type == "cpu" and acc == torch.float32 and USE_MKL_PACKED and torch._C.has_mkl):
        return None
    try:
        reorder = torch.ops.mkl._mkl_reorder_linear_weight
        torch.ops.mkl._mkl_linear  # noqa: B018 (both ops, or neither)
    except (AttributeError, RuntimeError):
        return None
    w_lin = m.to(acc).t().contiguous()  # linear(x, W) = x W^T, so W = M^T
    return reorder(w_lin, batch), w_lin


def _forward_loop(gates: Tensor, hs: Tensor, cs: Tensor, weight_hh: Tensor, mm,
                  compiled: bool) -> None:
    """The recurrence. gates [T,B,4H] holds x W^T + b; on return it holds the activations (i, f, g, o).

    hs/cs [T+1,B,H] (index 0 = the initial state), weight_hh U [4H,H]. tanh(c_t) goes through one
    [B,H] scratch that stays in cache (the backward recomputes it for the whole window in one op:
    measured ~0.7 ms a layer and window faster at 2 x 256, batch 32, than keeping a [T,B,H] buffer).
    Per-step views of the buffers come from `BufferPool.steps` (made once per pooled buffer); the
    eager step is 7 in-place ops on them.
    """
    loops = _cpu_loops(gates, mm, compiled)
    if loops is not None:
        u_t = weight_hh.to(gates.dtype).t()  # a view: addmm reads it transposed, the packed GEMM packs from it
        loops.forward_loop(gates, hs, cs, u_t, *(_mkl_packed(u_t, gates.shape[1], gates.dtype) or (None, None)))
        return
    steps, batch, four_h = gates.shape
    hid = four_h // 4
    steps_of = _POOL.steps
    g_t, h_t, c_t = steps_of(gates), steps_of(hs), steps_of(cs)
    tc = torch.empty(batch, hid, device=gates.device, dtype=gates.dtype)
    if_t = steps_of(gates, 0, 2 * hid)  # i and f: one sigmoid over both
    i_t, f_t, gg_t, o_t = (steps_of(gates, k * hid, (k + 1) * hid) for k in range(4))

    product = _recurrent_product(weight_hh, True, batch, gates.dtype, mm)
    # the step's views, zipped once per window
    views = list(zip(if_t, gg_t, o_t, i_t, f_t, c_t[:-1], c_t[1:], itertools.repeat(tc), h_t[1:]))
    if compiled:
        pointwise = _compiled_or_eager("fwd", _fwd_pointwise, lambda t: _fwd_eager(*views[t]),
                                       lambda t: (g_t[t], c_t[t], c_t[t + 1], h_t[t + 1]))
        for t in range(steps):
            product(h_t[t], g_t[t], g_t[t])
            pointwise(t)
        return
    for g, h_prev, step_views in zip(g_t, h_t, views):
        product(h_prev, g, g)
        _fwd_eager(*step_views)


def _cpu_loops(gates: Tensor, mm, compiled: bool):
    """The compiled C++ loops (`lstm_dist.cpu_loops`) where they apply: fp32 on the CPU, no autocast
    matmul dtype, not the compiled-steps path; else None (the eager loops run)."""
    if not CPU_LOOPS or compiled or mm is not None or gates.device.type != "cpu" or gates.dtype != torch.float32:
        return None
    return cpu_loops.get()


def _fwd_eager(i_f, gg, o, i, f, c_prev, c, tc, h) -> None:
    """The eager forward step on one step's views: 7 in-place ops, no allocation."""
    i_f.sigmoid_()
    gg.tanh_()
    o.sigmoid_()
    torch.mul(f, c_prev, out=c)
    c.addcmul_(i, gg)
    torch.tanh(c, out=tc)
    torch.mul(o, tc, out=h)


def _backward_coefficients(gates: Tensor, hs: Tensor, cs: Tensor, coef: Tensor, dc_coef: Tensor) -> None:
    """Everything of the backward step that does not depend on the incoming gradient, for the whole
    window at once (8 large vector ops instead of per-step work). With a = (i, f, g, o) the
    activations, tc = tanh(c_t) and h_t = o·tc, it writes

        coef[t] = [g·i(1-i), c_{t-1}·f(1-f), i·(1-g²), tc·o(1-o)]     ([T,B,4H], gate order)
        dc_coef[t] = o·(1 - tc²)                                       ([T,B,H])

    so that the step is (di, df, dg)_t = dc_t ⊙ coef[t][:, :3H] (per gate), do_t = dh_t ⊙ coef[t][:, 3H:],
    dc_t = dc_{t+1} f_{t+1} + dh_t ⊙ dc_coef[t]. The saved tensors are only read (backward may run
    twice on one forward, as gradcheck does)."""
    hid = gates.shape[2] // 4
    i, f, g, o = gates.split(hid, dim=2)
    k_i, k_f, k_g, k_o = coef.split(hid, dim=2)
    torch.addcmul(i, i, i, value=-1.0, out=k_i).mul_(g)  # g i (1 - i)
    torch.addcmul(f, f, f, value=-1.0, out=k_f).mul_(cs[:-1])  # c_{t-1} f (1 - f)
    torch.mul(g, g, out=k_g)
    torch.addcmul(i, i, k_g, value=-1.0, out=k_g)  # i (1 - g^2)
    h = hs[1:]
    torch.addcmul(h, h, o, value=-1.0, out=k_o)  # tc o (1 - o) = h - h o
    torch.tanh(cs[1:], out=dc_coef)
    torch.addcmul(o, h, dc_coef, value=-1.0, out=dc_coef)  # o (1 - tc^2) = o - h tc


def _bwd_pointwise(dh: Tensor, dc: Tensor, dc_coef: Tensor, coef: Tensor, f: Tensor, dgates: Tensor) -> None:
    """Step t of the backward, for torch.compile to fuse: from dh_t and dc (= dc_{t+1} f_{t+1}) writes
    dgates_t and leaves dc_t f_t in dc (`_backward_coefficients` has the coefficients). The eager form
    is the in-place ops in `_backward_loop`."""
    hid = dc.shape[1]
    dct = dc + dh * dc_coef
    dgates.copy_(torch.cat([(dct.unsqueeze(1) * coef[:, : 3 * hid].unflatten(1, (3, hid))).flatten(1),
                            dh * coef[:, 3 * hid :]], dim=1))
    dc.copy_(dct * f)


def _backward_loop(gates: Tensor, hs: Tensor, cs: Tensor, dy: Tensor, dc: Tensor, dgates: Tensor,
                   weight_hh: Tensor, mm, compiled: bool) -> None:
    """The reverse recurrence: fills dgates [T,B,4H] (gradient of the pre-activations); dc [B,H] goes
    from dc_T to dc_{-1} in place. The coefficients of the step are computed first for the whole
    window (`_backward_coefficients`, into pooled buffers); the eager step is then
    6 in-place ops on views made once per window, plus the recurrent product."""
    steps, batch, four_h = gates.shape
    hid = four_h // 4
    coef = _POOL.empty(tuple(gates.shape), gates.dtype, gates.device)
    dc_coef = _POOL.empty((steps, batch, hid), gates.dtype, gates.device)
    _backward_coefficients(gates, hs, cs, coef, dc_coef)
    dh = torch.empty(batch, hid, device=dy.device, dtype=dy.dtype)
    loops = _cpu_loops(gates, mm, compiled)
    if loops is not None:
        u = weight_hh.to(gates.dtype)
        loops.backward_loop(gates, dy.contiguous(), coef, dc_coef, u, dc, dh, dgates,
                            *(_mkl_packed(u, batch, gates.dtype) or (None, None)))
        return
    steps_of = _POOL.steps
    dy_t, dg_t, k_t, a_t = dy.unbind(0), steps_of(dgates), steps_of(coef), steps_of(dc_coef)
    f_t = steps_of(gates, hid, 2 * hid)
    # per gate: the gradient's views and its coefficient's (one broadcast product over [B,3,H]
    # measured 2x slower than these three plain ones)
    d_t = [steps_of(dgates, k * hid, (k + 1) * hid) for k in range(4)]
    c_t = [steps_of(coef, k * hid, (k + 1) * hid) for k in range(4)]

    product = _recurrent_product(weight_hh, False, batch, dy.dtype, mm)
    nexts = (None,) + dg_t[:0:-1]  # dgates_{t+1} for t = T-1 .. 0 (none after the last step)
    per_step = list(zip(nexts, dy_t[::-1], a_t[::-1], f_t[::-1], *(v[::-1] for v in c_t), *(v[::-1] for v in d_t)))
    if compiled:
        pointwise = _compiled_or_eager("bwd", _bwd_pointwise, lambda t: _bwd_eager(dh, dc, *per_step[steps - 1 - t][2:]),
                                       lambda t: (dh, dc, a_t[t], k_t[t], f_t[t], dg_t[t]))
        for t in range(steps - 1, -1, -1):
            if t == steps - 1:
                dh.copy_(dy_t[t])
            else:
                product(dg_t[t + 1], dy_t[t], dh)
            pointwise(t)
        return
    for nxt, dy_step, *step_views in per_step:
        if nxt is None:
            dh.copy_(dy_step)
        else:
            product(nxt, dy_step, dh)  # dh_t = dy_t + dgates_{t+1} U
        _bwd_eager(dh, dc, *step_views)


def _bwd_eager(dh, dc, a, f, k_i, k_f, k_g, k_o, d_i, d_f, d_g, d_o) -> None:
    """The eager backward step on one step's views: 6 in-place ops, no allocation. From dh_t and dc
    (= dc_{t+1} f_{t+1}) it writes dgates_t and leaves dc_t f_t in dc."""
    dc.addcmul_(dh, a)  # dc_t = dc_{t+1} f_{t+1} + dh o (1 - tanh^2 c_t)
    torch.mul(dc, k_i, out=d_i)  # di
    torch.mul(dc, k_f, out=d_f)  # df
    torch.mul(dc, k_g, out=d_g)  # dg
    torch.mul(dh, k_o, out=d_o)  # do
    dc.mul_(f)


class LSTMWindow(torch.autograd.Function):
    """One layer over one window: (x [T,B,E], h0, c0 [B,H], W, U, b) -> (y [T,B,H], c_T [B,H]).

    h_T is y[-1]. `lowp` is the dtype of the matrix products (None: the state's dtype); `use_compile`
    selects the compiled pointwise step. Backward is derived by hand (see the module docstring).

    In the full-precision path the input gets a column of ones and W a column b ([W | b]), so the one
    input product also adds the bias and, in backward, the one weight product dgates^T [X | 1] also
    gives db as its last column (no separate broadcast copy or column sum over the window).
    """

    @staticmethod
    def forward(ctx, x, h0, c0, weight_ih, weight_hh, bias, lowp, use_compile):  # type: ignore[override]
        compile_fwd, _ = compile_steps(use_compile, x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            acc = c0.dtype
            steps, batch, n_in = x.shape
            hid = weight_hh.shape[1]
            dev = x.device
            mm = lowp if lowp is not None and lowp != acc else None
            gates = _POOL.empty((steps, batch, 4 * hid), acc, dev)
            hs = _POOL.empty((steps + 1, batch, hid), acc, dev)  # hs[0] = h0, hs[t+1] = h_t
            cs = _POOL.empty((steps + 1, batch, hid), acc, dev)  # cs[0] = c0
            hs[0].copy_(h0)
            cs[0].copy_(c0)
            if mm is None:
                # [X | 1], rows unpadded: measured faster for dgates^T [X | 1] than 16-aligned rows
                xa = _POOL.empty((steps * batch, n_in + 1), acc, dev)
                xa[:, :n_in].copy_(x.reshape(steps * batch, n_in))
                xa[:, n_in].fill_(1.0)
                wa = torch.cat([weight_ih.to(acc), bias.to(acc).unsqueeze(1)], dim=1)  # [4H, E+1]
                torch.mm(xa, wa.t(), out=gates.view(steps * batch, 4 * hid))
            else:
                xa = x
                gates.view(steps * batch, -1).copy_(torch.mm(x.reshape(steps * batch, n_in).to(mm), weight_ih.to(mm).t()))
                gates.add_(bias.to(acc))
            _forward_loop(gates, hs, cs, weight_hh, mm, compile_fwd)
        ctx.save_for_backward(xa, weight_ih, weight_hh, gates, hs, cs)
        ctx.lowp = mm
        ctx.use_compile = use_compile
        ctx.dtypes = (x.dtype, h0.dtype, weight_ih.dtype, weight_hh.dtype, bias.dtype)
        return hs[1:], cs[steps].clone()

    @staticmethod
    def backward(ctx, dy, dc_last):  # type: ignore[override]
        xa, weight_ih, weight_hh, gates, hs, cs = ctx.saved_tensors
        _, compile_bwd = compile_steps(ctx.use_compile, dy.device.type)
        mm = ctx.lowp
        x_dtype, h_dtype, wi_dtype, wh_dtype, b_dtype = ctx.dtypes
        need_x, need_h0, need_c0, need_wi, need_wh, need_b = ctx.needs_input_grad[:6]
        dx = dh0 = dw_ih = dw_hh = db = None
        with torch.autocast(dy.device.type, enabled=False):
            acc = gates.dtype
            steps, batch, four_h = gates.shape
            hid = four_h // 4
            n_in = weight_ih.shape[1]
            dy = dy.to(acc)  # may be an expanded view (e.g. from a sum); only read per step
            dgates = _POOL.empty(tuple(gates.shape), acc, gates.device)
            dc = dc_last.to(acc).clone()
            mdt = acc if mm is None else mm
            u = weight_hh.to(mdt)
            _backward_loop(gates, hs, cs, dy, dc, dgates, weight_hh, mm, compile_bwd)
            # the weight gradients: single products over all T*B rows of the window
            dg2 = dgates.view(steps * batch, four_h)
            dg_m = dg2 if mm is None else dg2.to(mm)
            if need_x:
                dx = torch.mm(dg_m, weight_ih.to(mdt)).view(steps, batch, n_in)
            if need_h0:
                dh0 = torch.mm(dg_m[:batch], u)
            if need_wh:
                dw_hh = torch.mm(dg_m.t(), hs[:steps].view(steps * batch, hid).to(mdt))
            if mm is None:
                if need_wi or need_b:
                    # [X | 1]^T dgates = [dW | db]^T ([E+1, 4H]); this operand order measured
                    # 10-15% faster than dgates^T [X | 1] here. dW is handed back as a transposed view.
                    dwa_t = torch.mm(xa.t(), dg2)
                    dw_ih, db = dwa_t[:n_in].t(), dwa_t[n_in]
            else:
                if need_wi:
                    dw_ih = torch.mm(dg_m.t(), xa.reshape(steps * batch, n_in).to(mm))
                if need_b:
                    db = dg2.sum(0)
        cast = lambda g, dt: None if g is None else g.to(dt)  # noqa: E731
        return (
            cast(dx, x_dtype),
            cast(dh0, h_dtype),
            cast(dc, h_dtype) if need_c0 else None,
            cast(dw_ih, wi_dtype) if need_wi else None,
            cast(dw_hh, wh_dtype),
            cast(db, b_dtype) if need_b else None,
            None,
            None,
        )


def lstm_layer_fast(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Tensor,
    use_compile: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """A layer over a window with the hand-written backward: x [T,B,E] -> (y [T,B,H], h_T, c_T)."""
    lowp = _lowp_dtype(x.device)
    y, c_last = LSTMWindow.apply(x, h0, c0, weight_ih, weight_hh, bias, lowp, use_compile)
    return y, y[-1], c_last

