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
`Kernels` in force, read for its `products`). The backward equations are in `fast`'s docstring.

The pointwise update of a step exists in three forms, the same equations (`cell.cell_update`):
- eager (`eager_forward`, `eager_backward`): in-place ATen ops on per-step views made once per pooled
  buffer, forward 7 ops, backward 6, no allocation (`tests/test_fast_path.py` pins the counts). The
  definition, and what runs wherever another form does not apply.
- compiled (`compiled_forward`, `compiled_backward`): a functional form of the step (`_fwd_pointwise`,
  `_bwd_pointwise`) that `torch.compile` fuses, compiled once per process and shape on first use (each
  shape with a code object of its own, so dynamo's recompile limit is never met). A small function
  with fixed shapes, never the time loop, so compile time does not grow with the window. The forward
  step writes outputs of one size only ([B,H]: c_t, h_t, and under autocast h_t in the product's
  dtype), so it is one kernel; the activations are written for the whole window after the loop
  (`_activate`). Where compiling fails (no C++ toolchain, no Triton, anything at any call) the same
  functions run uncompiled from then on; the failure is recorded (`compile_failure()`), agreed by every
  rank of a training run at its next log step and said once (`training.loop`).
- C++ (`cpp_forward`, `cpp_backward`): both loops in `csrc/lstm_loops.cpp` (`lstm_dist.model.cpu_loops`
  builds it), the cell update in one vectorised pass over the rows and no Python between steps; for
  fp32 on the CPU without autocast (a 2 × 256, batch-32 training step: ~12% faster than eager); a product
  that makes a tensor of its own is added in the row pass that reads it, and the backward computes
  `_backward_coefficients`' terms in its row pass instead of two window-sized buffers. A
  window it cannot take, or a process where the build failed, runs the eager loops (~5e-7 apart).

The recurrent product (`recurrent_product`) is shared by all three: fp32 on the CPU by the
implementation measured fastest on the machine (`lstm_dist.model.products`: BLAS addmm, MKL's packed
GEMM or oneDNN's inner product, U packed or laid out once per window; `Kernels.products`), else one
addmm into the gates buffer; under autocast the product in `mm`,
accumulated in fp32: one addmm with `out_dtype` where the device has it (CUDA), else mm then add.
"""

from __future__ import annotations

import itertools
import types
import warnings
from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch
from torch import Tensor

from lstm_dist.common.errors import first_line
from lstm_dist.model import cpu_loops, products
from lstm_dist.model.buffers import POOL
from lstm_dist.model.cell import cell_update

if TYPE_CHECKING:  # annotations only: kernels.py imports this module
    from lstm_dist.model.kernels import Kernels


# ---------------------------------------------------------------------------- the recurrent product


def recurrent_product(weight: Tensor, transposed: bool, batch: int, acc: torch.dtype, mm: Optional[torch.dtype],
                      impl: str = "blas", cast: bool = True) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The per-step product of the recurrence, as `product(x, add, out)`: out = add + x M with
    M = weight^T (`transposed`: the forward's h U^T) or M = weight (the backward's dgates U).

    fp32 on the CPU: by `impl`, the implementation chosen for the machine (`lstm_dist.model.products`:
    BLAS addmm on a contiguous M, MKL's packed GEMM or oneDNN's inner product, M packed or laid out once
    per window). Elsewhere one addmm; under autocast (`mm`, e.g. bf16) the product in that dtype: where
    the device's addmm takes `out_dtype` (CUDA, `product_to_acc`) one addmm that multiplies in `mm` and
    accumulates and writes in `acc`, else mm then an add in `acc`. `cast` False: x comes in `mm` already
    (the compiled steps write it so), no cast kernel per step.
    """
    m = weight.t() if transposed else weight  # [K, N]
    if mm is None:
        return products.linear(impl, m.to(acc).contiguous(), batch)
    m_low = m.to(mm).contiguous()
    low = (lambda x: x.to(mm)) if cast else (lambda x: x)
    if product_to_acc(m.device, mm, acc):
        return lambda x, add, out: torch.addmm(add, low(x), m_low, out_dtype=acc, out=out)
    return lambda x, add, out: torch.add(add, torch.mm(low(x), m_low), out=out)


_PRODUCT_TO_ACC: dict = {}


def product_to_acc(device: torch.device, mm: torch.dtype, acc: torch.dtype) -> bool:
    """Whether `torch.addmm(add, a, b, out_dtype=acc, out=add)` with a, b in `mm` runs on `device` and
    gives add + a b (one kernel where cast + mm + add were three): torch's CUDA addmm takes out_dtype
    fp32 for bf16/fp16 operands (torch >= 2.8); the CPU's does not. Asked once per process and
    (device type, dtypes), on a 16 x 16 case written in place, against the three-op form."""
    key = (device.type, mm, acc)
    if key not in _PRODUCT_TO_ACC:
        ok = False
        if device.type == "cuda":
            try:
                g = torch.Generator(device="cpu").manual_seed(0)
                a, b, c = (torch.randn(16, 16, generator=g).to(device) for _ in range(3))
                want = c + torch.mm(a.to(mm), b.to(mm)).to(acc)
                got = c.to(acc).clone()
                torch.addmm(got, a.to(mm), b.to(mm), out_dtype=acc, out=got)
                ok = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))
            except (RuntimeError, TypeError):
                ok = False
        _PRODUCT_TO_ACC[key] = ok
    return _PRODUCT_TO_ACC[key]


# ---------------------------------------------------------------------------- the compiled step


def _fwd_pointwise(gates: Tensor, c_prev: Tensor, c_out: Tensor, h_out: Tensor) -> None:
    """Step t of the forward, for torch.compile to fuse into one kernel over [B,H]: from the
    pre-activations gates [B,4H] (only read) and c_{t-1}, writes c_t and h_t. Every output has one
    size, so inductor makes one kernel of it (writing the activations back into gates too, [B,4H],
    made two); the window's activations are written after the loop in one pass (`_activate`)."""
    _, _, _, o, c, tc = cell_update(gates, c_prev)
    c_out.copy_(c)
    h_out.copy_(o * tc)


def _fwd_pointwise_low(gates: Tensor, c_prev: Tensor, c_out: Tensor, h_out: Tensor, h_low: Tensor) -> None:
    """`_fwd_pointwise` under autocast: also writes h_t in the products' dtype (h_low, e.g. bf16), the
    next step's recurrent product's operand, so that no cast kernel runs between the steps."""
    _fwd_pointwise(gates, c_prev, c_out, h_out)
    h_low.copy_(h_out)


def _activate(gates: Tensor) -> None:
    """Pre-activations [T,B,4H] -> the activations (i, f, g, o), in place, for the whole window at once
    (three ops; the loops' contract: gates holds the activations when the forward loop returns)."""
    hid = gates.shape[-1] // 4
    gates[..., : 2 * hid].sigmoid_()
    gates[..., 2 * hid : 3 * hid].tanh_()
    gates[..., 3 * hid :].sigmoid_()


def _bwd_pointwise(dh: Tensor, dc: Tensor, dc_coef: Tensor, coef: Tensor, f: Tensor, dgates: Tensor) -> None:
    """Step t of the backward, for torch.compile to fuse: from dh_t and dc (= dc_{t+1} f_{t+1}) writes
    dgates_t and leaves dc_t f_t in dc (`_backward_coefficients` has the coefficients). The eager form
    is `_bwd_eager`. (Two output sizes, [B,4H] and [B,H]: likely two kernels; see docs/gpu.md.)"""
    hid = dc.shape[1]
    dct = dc + dh * dc_coef
    dgates.copy_(torch.cat([(dct.unsqueeze(1) * coef[:, : 3 * hid].unflatten(1, (3, hid))).flatten(1),
                            dh * coef[:, 3 * hid :]], dim=1))
    dc.copy_(dct * f)


def _bwd_pointwise_low(dh: Tensor, dc: Tensor, dc_coef: Tensor, coef: Tensor, f: Tensor, dgates: Tensor,
                       dgates_low: Tensor) -> None:
    """`_bwd_pointwise` under autocast: also writes dgates_t in the products' dtype (dgates_low, the
    size of dgates, so no new output size), the next step's product operand: no cast kernel."""
    _bwd_pointwise(dh, dc, dc_coef, coef, f, dgates)
    dgates_low.copy_(dgates)


_COMPILED: dict = {}  # this process's compiled steps, by (step, shapes and dtypes of its arguments)
_COMPILE_FAILURE: Optional[str] = None  # why compiling failed in this process (None: it has not)


def compile_available() -> bool:
    """False once compiling a pointwise step has failed in this process, or `disable_compile` was
    called: the same functions run uncompiled since."""
    return _COMPILE_FAILURE is None


def compile_failure() -> Optional[str]:
    """Why the compiled steps stopped in this process ("RuntimeError: ..."), or None."""
    return _COMPILE_FAILURE


def disable_compile(why: str) -> None:
    """Run the pointwise steps uncompiled from now on in this process (every rank does so together
    when one rank's compile failed: `training.loop`), keeping the first reason."""
    global _COMPILE_FAILURE
    if _COMPILE_FAILURE is None:
        _COMPILE_FAILURE = why


def _own_code(fn: Callable, tag: str) -> Callable:
    """`fn` with a code object of its own: dynamo keeps its compiled graphs, and counts recompiles
    against `recompile_limit` (8), per code object, so one per shape never meets the limit."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _compiled(functional: Callable, args: tuple) -> Callable:
    """`functional` compiled for these arguments' shapes and dtypes (once per process and key)."""
    key = (functional.__name__, tuple((tuple(a.shape), tuple(a.stride()), a.dtype, a.device.type) for a in args))
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = torch.compile(_own_code(functional, str(len(_COMPILED))), dynamic=False,
                                            fullgraph=True)
    return fn


def _compiled_or_eager(functional: Callable, args_of: Callable[[int], tuple]) -> Callable[[int], None]:
    """Step t through `functional` compiled for its shapes, or run as it is (the same ops, uncompiled,
    the same results to rounding) once compiling has failed in this process. A failure is recorded
    (`compile_failure`): a training run agrees on it across ranks at its next log step and says it
    once there; a process with no process group (bench, generate) gets one warning here."""

    def step(t: int) -> None:
        args = args_of(t)
        if _COMPILE_FAILURE is None:
            try:
                return _compiled(functional, args)(*args)
            except Exception as exc:
                disable_compile(f"{type(exc).__name__}: {first_line(exc)}")
                if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                    warnings.warn(f"torch.compile of the LSTM pointwise step failed ({_COMPILE_FAILURE}); "
                                  "running the same step uncompiled", RuntimeWarning, stacklevel=2)
        functional(*args)

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
    measured ~0.7 ms a layer and window faster at 2 x 256, batch 32, than keeping a [T,B,H] buffer).
    The compiled step leaves the pre-activations in gates and `_activate` turns them into activations
    after the loop; under autocast it also writes h_t in the products' dtype for the next product."""
    steps, batch, four_h = gates.shape
    hid = four_h // 4
    steps_of = POOL.steps
    g_t, h_t, c_t = steps_of(gates), steps_of(hs), steps_of(cs)
    if compiled:
        if mm is None:
            product = recurrent_product(weight_hh, True, batch, gates.dtype, mm, kernels.products.step_fwd)
            pointwise = _compiled_or_eager(_fwd_pointwise, lambda t: (g_t[t], c_t[t], c_t[t + 1], h_t[t + 1]))
            for t in range(steps):
                product(h_t[t], g_t[t], g_t[t])
                pointwise(t)
        else:
            low = torch.empty(2, batch, hid, device=gates.device, dtype=mm)  # h_{t-1} for step t: low[t % 2]
            low[0].copy_(h_t[0])
            product = recurrent_product(weight_hh, True, batch, gates.dtype, mm, kernels.products.step_fwd, cast=False)
            pointwise = _compiled_or_eager(_fwd_pointwise_low,
                                           lambda t: (g_t[t], c_t[t], c_t[t + 1], h_t[t + 1], low[(t + 1) % 2]))
            for t in range(steps):
                product(low[t % 2], g_t[t], g_t[t])
                pointwise(t)
        _activate(gates)
        return
    tc = torch.empty(batch, hid, device=gates.device, dtype=gates.dtype)
    if_t = steps_of(gates, 0, 2 * hid)  # i and f: one sigmoid over both
    i_t, f_t, gg_t, o_t = (steps_of(gates, k * hid, (k + 1) * hid) for k in range(4))
    product = recurrent_product(weight_hh, True, batch, gates.dtype, mm, kernels.products.step_fwd)
    # the step's views, zipped once per window
    views = zip(if_t, gg_t, o_t, i_t, f_t, c_t[:-1], c_t[1:], itertools.repeat(tc), h_t[1:])
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
    u_t = weight_hh.to(gates.dtype).t()  # a view: addmm reads it transposed; the other products lay it out
    product = products.linear(kernels.products.step_fwd, u_t, gates.shape[1])
    lib.forward_loop(gates, hs, cs, u_t, *product.cpp_args())


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

    product = recurrent_product(weight_hh, False, batch, dy.dtype, mm, kernels.products.step_bwd)
    nexts = (None,) + dg_t[:0:-1]  # dgates_{t+1} for t = T-1 .. 0 (none after the last step)
    per_step = list(zip(nexts, dy_t[::-1], a_t[::-1], f_t[::-1], *(v[::-1] for v in c_t), *(v[::-1] for v in d_t)))
    if compiled and mm is not None:  # the step also writes dgates_t in `mm`: the next product's operand
        low = torch.empty(2, batch, four_h, device=dy.device, dtype=mm)
        product = recurrent_product(weight_hh, False, batch, dy.dtype, mm, kernels.products.step_bwd, cast=False)
        pointwise = _compiled_or_eager(_bwd_pointwise_low,
                                       lambda t: (dh, dc, a_t[t], k_t[t], f_t[t], dg_t[t], low[t % 2]))
        for t in range(steps - 1, -1, -1):
            if t == steps - 1:
                dh.copy_(dy_t[t])
            else:
                product(low[(t + 1) % 2], dy_t[t], dh)
            pointwise(t)
        return
    if compiled:
        pointwise = _compiled_or_eager(_bwd_pointwise, lambda t: (dh, dc, a_t[t], k_t[t], f_t[t], dg_t[t]))
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
    dh = torch.empty(batch, hid, device=dy.device, dtype=dy.dtype)
    u = weight_hh.to(gates.dtype)
    product = products.linear(kernels.products.step_bwd, u, batch)
    # the coefficients of _backward_coefficients are computed in the loop's row pass, from these
    lib.backward_loop(gates, hs, cs, dy.contiguous(), u, dc, dh, dgates, *product.cpp_args())