"""The fast path's time loops: per step the recurrent product and the pointwise cell update.

`lstm_dist.model.fast` computes everything of a window that is one big product (the input projection,
the weight gradients); what is left is serial, step by step, and lives here, as the loops of the
kernel table's entries (`lstm_dist.model.kernels`), each with the signatures

    forward(gates, hs, cs, weight_hh, mm, kernels)                 gates [T,B,4H] holds x W^T + b and on
                                                                   return the activations (i, f, g, o);
                                                                   fills hs/cs [T+1,B,H] (index 0: the
                                                                   initial state)
    backward(gates, hs, cs, dy, dc, dgates, weight_hh, mm, kernels) fills dgates [T,B,4H] (the gradient of
                                                                   the pre-activations); dc [B,H] goes from
                                                                   dc_T to dc_{-1} in place

(`mm`: the dtype of the matrix products under autocast, None for the state's own; `kernels`: the
`Kernels` in force, read for `mkl_packed`). The backward equations are in `fast`'s docstring.

The pointwise update of a step exists in three forms, the same equations (`cell.cell_update`):
- eager (`eager_forward`, `eager_backward`): in-place ATen ops on per-step views made once per pooled
  buffer, forward 7 ops, backward 6, no allocation (`tests/test_fast_path.py` pins the counts). The
  definition, and what runs wherever another form does not apply.
- compiled (`compiled_forward`, `compiled_backward`): a functional form of the step (`_fwd_pointwise`,
  `_bwd_pointwise`) that `torch.compile` fuses into one kernel per step, compiled once per process on
  first use. A small function with fixed shapes, never the time loop, so compile time does not grow
  with the window. Where compiling fails (no C++ toolchain, no Triton) the eager step runs from then on,
  after one warning (`compile_available()` says so).
- C++ (`cpp_forward`, `cpp_backward`): both loops in `csrc/lstm_loops.cpp` (`lstm_dist.model.cpu_loops`
  builds it), the cell update in one vectorised pass over the rows and no Python between steps; for
  fp32 on the CPU without autocast (a 2 × 256, batch-32 training step: ~12% faster than eager). A
  window it cannot take, or a process where the build failed, runs the eager loops (~5e-7 apart).

The recurrent product (`recurrent_product`) is shared by all three: MKL's packed-weight GEMM where this
torch has it and the window is fp32 on the CPU (U packed once per window instead of inside every call;
`Kernels.mkl_packed`), else one addmm into the gates buffer; under autocast the product in `mm`,
added in fp32.
"""

from __future__ import annotations

import itertools
import warnings
from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch
from torch import Tensor

from lstm_dist.common.errors import first_line
from lstm_dist.model import cpu_loops
from lstm_dist.model.buffers import POOL
from lstm_dist.model.cell import cell_update

if TYPE_CHECKING:  # annotations only: kernels.py imports this module
    from lstm_dist.model.kernels import Kernels


# ---------------------------------------------------------------------------- the recurrent product


def recurrent_product(weight: Tensor, transposed: bool, batch: int, acc: torch.dtype, mm: Optional[torch.dtype],
                      mkl_packed: bool) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The per-step product of the recurrence, as `product(x, add, out)`: out = add + x M with
    M = weight^T (`transposed`: the forward's h U^T) or M = weight (the backward's dgates U).

    Three ways, chosen once per window: MKL's packed-weight GEMM (torch.ops.mkl, what inductor uses
    for fp32 linear on CPU: M packed once per window instead of inside every call) where
    `packed_weight` gives one; else one addmm; under autocast (`mm`, e.g. bf16) the product in that
    dtype, added in fp32.
    """
    m = weight.t() if transposed else weight  # [K, N]
    packed = packed_weight(m, batch, acc, mkl_packed) if mm is None else None
    if packed is not None:
        w_packed, w_lin = packed
        linear = torch.ops.mkl._mkl_linear
        return lambda x, add, out: torch.add(add, linear(x, w_packed, w_lin, None, batch), out=out)
    if mm is None:
        m_acc = m.to(acc).contiguous()
        return lambda x, add, out: torch.addmm(add, x, m_acc, out=out)
    m_low = m.to(mm).contiguous()
    return lambda x, add, out: torch.add(add, torch.mm(x.to(mm), m_low), out=out)


def packed_weight(m: Tensor, batch: int, acc: torch.dtype, enabled: bool) -> Optional[Tuple[Tensor, Tensor]]:
    """(M packed for MKL's GEMM at this batch, the M^T it was packed from) for out = x M, where
    `enabled` (`Kernels.mkl_packed`), this torch has MKL's packed GEMM and M is fp32 on the CPU; else None."""
    if not (enabled and m.device.type == "cpu" and acc == torch.float32 and torch._C.has_mkl):
        return None
    try:
        reorder = torch.ops.mkl._mkl_reorder_linear_weight
        torch.ops.mkl._mkl_linear  # noqa: B018 (both ops, or neither)
    except (AttributeError, RuntimeError):
        return None
    w_lin = m.to(acc).t().contiguous()  # linear(x, W) = x W^T, so W = M^T
    return reorder(w_lin, batch), w_lin


# ---------------------------------------------------------------------------- the compiled step


def _fwd_pointwise(gates: Tensor, c_prev: Tensor, c_out: Tensor, h_out: Tensor) -> None:
    """Step t of the forward, for torch.compile to fuse: gates (pre-activations [B,4H]) become the
    activations; writes c' and h'. The eager form is `_fwd_eager`."""
    i, f, g, o, c, tc = cell_update(gates, c_prev)
    gates.copy_(torch.cat([i, f, g, o], dim=1))
    c_out.copy_(c)
    h_out.copy_(o * tc)


def _bwd_pointwise(dh: Tensor, dc: Tensor, dc_coef: Tensor, coef: Tensor, f: Tensor, dgates: Tensor) -> None:
    """Step t of the backward, for torch.compile to fuse: from dh_t and dc (= dc_{t+1} f_{t+1}) writes
    dgates_t and leaves dc_t f_t in dc (`_backward_coefficients` has the coefficients). The eager form
    is `_bwd_eager`."""
    hid = dc.shape[1]
    dct = dc + dh * dc_coef
    dgates.copy_(torch.cat([(dct.unsqueeze(1) * coef[:, : 3 * hid].unflatten(1, (3, hid))).flatten(1),
                            dh * coef[:, 3 * hid :]], dim=1))
    dc.copy_(dct * f)


_COMPILED: dict = {}  # this process's compiled steps, by name
_COMPILE_FAILED = False


def compile_available() -> bool:
    """False once compiling the pointwise step has failed in this process (the eager step runs since)."""
    return not _COMPILE_FAILED


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


# ---------------------------------------------------------------------------- forward


def _fwd_eager(i_f, gg, o, i, f, c_prev, c, tc, h) -> None:
    """The eager forward step on one step's views: 7 in-place ops, no allocation."""
    i_f.sigmoid_()
    gg.tanh_()
    o.sigmoid_()
    torch.mul(f, c_prev, out=c)
    c.addcmul_(i, gg)
    torch.tanh(c, out=tc)
    torch.mul(o, tc, out=h)


def _forward(gates: Tensor, hs: Tensor, cs: Tensor, weight_hh: Tensor, mm, kernels: "Kernels",
             compiled: bool) -> None:
    """The forward loop in Python, with the eager or the compiled step. tanh(c_t) goes through one
    [B,H] scratch that stays in cache (the backward recomputes it for the whole window in one op:
    measured ~0.7 ms a layer and window faster at 2 x 256, batch 32, than keeping a [T,B,H] buffer)."""
    steps, batch, four_h = gates.shape
    hid = four_h // 4
    steps_of = POOL.steps
    g_t, h_t, c_t = steps_of(gates), steps_of(hs), steps_of(cs)
    tc = torch.empty(batch, hid, device=gates.device, dtype=gates.dtype)
    if_t = steps_of(gates, 0, 2 * hid)  # i and f: one sigmoid over both
    i_t, f_t, gg_t, o_t = (steps_of(gates, k * hid, (k + 1) * hid) for k in range(4))

    product = recurrent_product(weight_hh, True, batch, gates.dtype, mm, kernels.mkl_packed)
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


def eager_forward(gates: Tensor, hs: Tensor, cs: Tensor, weight_hh: Tensor, mm, kernels: "Kernels") -> None:
    """The forward loop with the eager step (signature: the module docstring)."""
    _forward(gates, hs, cs, weight_hh, mm, kernels, compiled=False)


def compiled_forward(gates: Tensor, hs: Tensor, cs: Tensor, weight_hh: Tensor, mm, kernels: "Kernels") -> None:
    """The forward loop with the compiled step (signature: the module docstring)."""
    _forward(gates, hs, cs, weight_hh, mm, kernels, compiled=True)


def _cpp_module(gates: Tensor, mm):
    """The built C++ loops where they take this window (fp32 on the CPU, no autocast product), else None."""
    if mm is not None or gates.device.type != "cpu" or gates.dtype != torch.float32:
        return None
    return cpu_loops.get()


def cpp_forward(gates: Tensor, hs: Tensor, cs: Tensor, weight_hh: Tensor, mm, kernels: "Kernels") -> None:
    """The forward loop in C++ where it takes the window, else `eager_forward` (signature: the module docstring)."""
    lib = _cpp_module(gates, mm)
    if lib is None:
        return eager_forward(gates, hs, cs, weight_hh, mm, kernels)
    u_t = weight_hh.to(gates.dtype).t()  # a view: addmm reads it transposed, the packed GEMM packs from it
    lib.forward_loop(gates, hs, cs, u_t, *(packed_weight(u_t, gates.shape[1], gates.dtype, kernels.mkl_packed)
                                           or (None, None)))


# ---------------------------------------------------------------------------- backward


def _backward_coefficients(gates: Tensor, hs: Tensor, cs: Tensor) -> Tuple[Tensor, Tensor]:
    """Everything of the backward step that does not depend on the incoming gradient, for the whole
    window at once (8 large vector ops instead of per-step work), in pooled buffers. With
    a = (i, f, g, o) the activations, tc = tanh(c_t) and h_t = o·tc, it returns

        coef[t] = [g·i(1-i), c_{t-1}·f(1-f), i·(1-g²), tc·o(1-o)]     ([T,B,4H], gate order)
        dc_coef[t] = o·(1 - tc²)                                       ([T,B,H])

    so that the step is (di, df, dg)_t = dc_t ⊙ coef[t][:, :3H] (per gate), do_t = dh_t ⊙ coef[t][:, 3H:],
    dc_t = dc_{t+1} f_{t+1} + dh_t ⊙ dc_coef[t]. The saved tensors are only read (backward may run
    twice on one forward, as gradcheck does)."""
    steps, batch, four_h = gates.shape
    hid = four_h // 4
    coef = POOL.empty(tuple(gates.shape), gates.dtype, gates.device)
    dc_coef = POOL.empty((steps, batch, hid), gates.dtype, gates.device)
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
    return coef, dc_coef


def _bwd_eager(dh, dc, a, f, k_i, k_f, k_g, k_o, d_i, d_f, d_g, d_o) -> None:
    """The eager backward step on one step's views: 6 in-place ops, no allocation. From dh_t and dc
    (= dc_{t+1} f_{t+1}) it writes dgates_t and leaves dc_t f_t in dc."""
    dc.addcmul_(dh, a)  # dc_t = dc_{t+1} f_{t+1} + dh o (1 - tanh^2 c_t)
    torch.mul(dc, k_i, out=d_i)  # di
    torch.mul(dc, k_f, out=d_f)  # df
    torch.mul(dc, k_g, out=d_g)  # dg
    torch.mul(dh, k_o, out=d_o)  # do
    dc.mul_(f)


def _backward(gates: Tensor, hs: Tensor, cs: Tensor, dy: Tensor, dc: Tensor, dgates: Tensor, weight_hh: Tensor,
              mm, kernels: "Kernels", compiled: bool) -> None:
    """The reverse recurrence in Python, with the eager or the compiled step: the coefficients first
    for the whole window (`_backward_coefficients`), then per step the recurrent product and the
    step on views made once per window."""
    steps, batch, four_h = gates.shape
    hid = four_h // 4
    coef, dc_coef = _backward_coefficients(gates, hs, cs)
    dh = torch.empty(batch, hid, device=dy.device, dtype=dy.dtype)
    steps_of = POOL.steps
    dy_t, dg_t, k_t, a_t = dy.unbind(0), steps_of(dgates), steps_of(coef), steps_of(dc_coef)
    f_t = steps_of(gates, hid, 2 * hid)
    # per gate: the gradient's views and its coefficient's (one broadcast product over [B,3,H]
    # measured 2x slower than these three plain ones)
    d_t = [steps_of(dgates, k * hid, (k + 1) * hid) for k in range(4)]
    c_t = [steps_of(coef, k * hid, (k + 1) * hid) for k in range(4)]

    product = recurrent_product(weight_hh, False, batch, dy.dtype, mm, kernels.mkl_packed)
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


def eager_backward(gates: Tensor, hs: Tensor, cs: Tensor, dy: Tensor, dc: Tensor, dgates: Tensor,
                   weight_hh: Tensor, mm, kernels: "Kernels") -> None:
    """The backward loop with the eager step (signature: the module docstring)."""
    _backward(gates, hs, cs, dy, dc, dgates, weight_hh, mm, kernels, compiled=False)


def compiled_backward(gates: Tensor, hs: Tensor, cs: Tensor, dy: Tensor, dc: Tensor, dgates: Tensor,
                      weight_hh: Tensor, mm, kernels: "Kernels") -> None:
    """The backward loop with the compiled step (signature: the module docstring)."""
    _backward(gates, hs, cs, dy, dc, dgates, weight_hh, mm, kernels, compiled=True)


def cpp_backward(gates: Tensor, hs: Tensor, cs: Tensor, dy: Tensor, dc: Tensor, dgates: Tensor,
                 weight_hh: Tensor, mm, kernels: "Kernels") -> None:
    """The backward loop in C++ where it takes the window, else `eager_backward` (signature: the module
    docstring)."""
    lib = _cpp_module(gates, mm)
    if lib is None:
        return eager_backward(gates, hs, cs, dy, dc, dgates, weight_hh, mm, kernels)
    batch, hid = gates.shape[1], gates.shape[2] // 4
    coef, dc_coef = _backward_coefficients(gates, hs, cs)
    dh = torch.empty(batch, hid, device=dy.device, dtype=dy.dtype)
    u = weight_hh.to(gates.dtype)
    lib.backward_loop(gates, dy.contiguous(), coef, dc_coef, u, dc, dh, dgates,
                      *(packed_weight(u, batch, gates.dtype, kernels.mkl_packed) or (None, None)))
