"""Both time loops as one Triton kernel per step: the recurrent product with the cell update (forward)
or with the pointwise gradient (backward) as its epilogue (#19, its first part; opt-in: model.triton).

Per layer and time step the compiled path launches two kernels (`addmm` or `mm`, then the compiled
pointwise step) and the eager one eight; this is one. A program owns a tile of streams (rows, BLOCK_B)
and of hidden units (BLOCK_H); it accumulates, over the hidden dimension in chunks of BLOCK_K,

    acc_q = h_{t-1}[rows, :] · U_q[units, :]ᵀ        for each gate q in (i, f, g, o)

(U_q = weight_hh[q·H + units]: the four gates of the same units, read as four tiles of Uᵀ, so no
re-laid-out copy of U is needed), adds the input projection already in the gates buffer
(x Wᵀ + b, fp32), and writes, for its rows and units only: the activations (i, f, g, o) back into the
gates buffer (what the backward needs), c_t, h_t, and under autocast h_t in the products' dtype for the
next step's product. Products in the operands' dtype (bf16 under autocast; fp32 as TF32 where
`Kernels.tf32`, else IEEE), accumulation and state in fp32, as every other path (`cell.cell_update`'s
equations; tanh(x) is computed as 2·sigmoid(2x) − 1, Triton having no tanh of its own).

Backward (`lstm_backward_step`), per reverse step and the same tiles: dh_t = dy_t + dgates_{t+1} U over
the 4H columns of dgates_{t+1} (skipped at the window's last step), then as the epilogue the pointwise
gradient of `loops._bwd_eager`'s step from the window's coefficients (`loops._backward_coefficients`,
computed first for the whole window as every path does): dgates_t for its tile (and in bf16 for the
next product) and dc. Both follow the loop contract (`loops`' module docstring). Programs of one launch never wait for
each other (each reads all of h_{t-1}, written by the previous launch, and writes only its own tile),
so Triton's interpreter, which runs them one after another, computes what a GPU does
(`TRITON_INTERPRET=1`: how `tests/test_triton.py` runs it on the CPU; it also compiles the kernel for
Hopper without a GPU).

`available(device, batch, hidden)` says why this cannot run there (no triton, the CPU outside the
interpreter, a failed probe), or None.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # a CPU install without triton: the entry says why it cannot run
    triton = None
    _IMPORT_ERROR: Optional[str] = f"triton is not installed ({exc})"
else:
    _IMPORT_ERROR = None

if TYPE_CHECKING:
    from lstm_dist.model.kernels import Kernels


def interpreted() -> bool:
    """Whether this process runs Triton kernels with Triton's interpreter (TRITON_INTERPRET=1 when the
    kernel was defined): on CPU tensors, one program after another."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(lstm_forward_step, InterpretedFunction)


def available(device: torch.device, batch: int, hidden: int) -> Optional[str]:
    """None where the Triton step runs on `device` at [batch, hidden] in this process, else why not: no
    triton; the CPU outside Triton's interpreter; or, on CUDA, a 2-step window at these shapes that fails
    to build or run, or differs from the eager loops (a probe at start-up, like the compiled steps')."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type != "cuda" and not interpreted():
        return "Triton kernels run on CUDA (on the CPU only under TRITON_INTERPRET=1, as tests/test_triton.py does)"
    if device.type != "cuda":
        return None
    return probe(device, batch, hidden, torch.bfloat16)


def probe(device: torch.device, batch: int, hidden: int, low: torch.dtype) -> Optional[str]:
    """None where a 2-step window through both kernels at [batch, hidden], with fp32 and with `low`
    products, matches the eager loops on `device`; else why not (the exception's first line, or the
    difference). `available` runs it on CUDA with bf16; the interpreter test with fp16."""
    from lstm_dist.model import loops
    from lstm_dist.model.kernels import Kernels

    # a 2-step window through both kernels, in fp32 and with bf16 products (each variant is a kernel of
    # its own to build), against the eager loops: a check for gross errors (a wrong tile or stride), not
    # rounding (the eager product may run in TF32; values here lie within [-1, 1] or near it)
    g = torch.Generator(device="cpu").manual_seed(0)
    gates = torch.randn(2, batch, 4 * hidden, generator=g).to(device)
    u = (torch.randn(4 * hidden, hidden, generator=g) * hidden ** -0.5).to(device)
    dy = (torch.randn(2, batch, hidden, generator=g) * 0.1).to(device)
    for mm in (None, low):
        runs = []
        for forward, backward in ((triton_forward, triton_backward), (loops.eager_forward, loops.eager_backward)):
            gg, hs, cs = gates.clone(), torch.zeros(3, batch, hidden, device=device), torch.zeros(3, batch, hidden, device=device)
            dc, dgates = torch.zeros(batch, hidden, device=device), torch.empty_like(gates)
            try:
                forward(gg, hs, cs, u, mm, Kernels("eager"))
                backward(gg, hs, cs, dy, dc, dgates, u, mm, Kernels("eager"))
            except Exception as exc:  # noqa: BLE001 - any failure to build or launch means: not this path
                text = str(exc).strip()
                return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            runs.append((gg, hs, cs, dgates, dc))
        worst = max(float((a - b).abs().max()) for a, b in zip(*runs))
        if not worst < 5e-2:
            return f"its 2-step probe ({mm or 'fp32'} products) differs from the eager loops by {worst:.3g}"
    return None


if triton is not None:

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
        """This program's rows (streams) and units, and which of them exist."""
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        return rows, units, rows < B, units < H

    @triton.jit
    def _store_gates(row_ptr, H, units, q_i, q_f, q_g, q_o, mask):
        """The four gates' [rows, units] values into a [B,4H] row block (gate order i, f, g, o)."""
        ty = row_ptr.dtype.element_ty
        tl.store(row_ptr + units[None, :], q_i.to(ty), mask=mask)
        tl.store(row_ptr + (H + units)[None, :], q_f.to(ty), mask=mask)
        tl.store(row_ptr + (2 * H + units)[None, :], q_g.to(ty), mask=mask)
        tl.store(row_ptr + (3 * H + units)[None, :], q_o.to(ty), mask=mask)

    @triton.jit
    def lstm_forward_step(h_ptr, u_ptr, gates_ptr, c_prev_ptr, c_ptr, h_out_ptr, h_low_ptr,
                          B, H, stride_h, stride_uk, stride_un, stride_g, stride_c, stride_hout, stride_low,
                          BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                          WRITE_LOW: tl.constexpr, PRECISION: tl.constexpr):
        """One time step for a [BLOCK_B, BLOCK_H] tile (module docstring). h [B,H] (h_{t-1}, the products'
        dtype); u [H,4H] (Uᵀ, element (k, n) at u_ptr + k·stride_uk + n·stride_un); gates [B,4H] fp32
        (in: x Wᵀ + b; out: the activations); c_prev, c, h_out [B,H] fp32; h_low [B,H] (WRITE_LOW)."""
        rows, units, rmask, umask = _tile(B, H, BLOCK_B, BLOCK_H)
        acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < H
            a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            wmask = kmask[:, None] & umask[None, :]
            w_base = u_ptr + ks[:, None] * stride_uk
            w_i = tl.load(w_base + units[None, :] * stride_un, mask=wmask, other=0.0)
            w_f = tl.load(w_base + (H + units)[None, :] * stride_un, mask=wmask, other=0.0)
            w_g = tl.load(w_base + (2 * H + units)[None, :] * stride_un, mask=wmask, other=0.0)
            w_o = tl.load(w_base + (3 * H + units)[None, :] * stride_un, mask=wmask, other=0.0)
            acc_i = tl.dot(a, w_i, acc_i, input_precision=PRECISION)
            acc_f = tl.dot(a, w_f, acc_f, input_precision=PRECISION)
            acc_g = tl.dot(a, w_g, acc_g, input_precision=PRECISION)
            acc_o = tl.dot(a, w_o, acc_o, input_precision=PRECISION)
        mask = rmask[:, None] & umask[None, :]
        g_row = gates_ptr + rows[:, None] * stride_g
        i = tl.sigmoid(acc_i + tl.load(g_row + units[None, :], mask=mask, other=0.0))
        f = tl.sigmoid(acc_f + tl.load(g_row + (H + units)[None, :], mask=mask, other=0.0))
        g = _tanh(acc_g + tl.load(g_row + (2 * H + units)[None, :], mask=mask, other=0.0))
        o = tl.sigmoid(acc_o + tl.load(g_row + (3 * H + units)[None, :], mask=mask, other=0.0))
        c_prev = tl.load(c_prev_ptr + rows[:, None] * stride_c + units[None, :], mask=mask, other=0.0)
        c = f * c_prev + i * g
        h = o * _tanh(c)
        _store_gates(g_row, H, units, i, f, g, o, mask)
        tl.store(c_ptr + rows[:, None] * stride_c + units[None, :], c, mask=mask)
        tl.store(h_out_ptr + rows[:, None] * stride_hout + units[None, :], h, mask=mask)
        if WRITE_LOW:
            tl.store(h_low_ptr + rows[:, None] * stride_low + units[None, :], h.to(h_low_ptr.dtype.element_ty),
                     mask=mask)

    @triton.jit
    def lstm_backward_step(dg_next_ptr, u_ptr, dy_ptr, coef_ptr, dc_coef_ptr, f_ptr, dc_ptr, dg_ptr, dg_low_ptr,
                           B, H, stride_dgn, stride_uk, stride_dy, stride_coef, stride_dcc, stride_f, stride_dc,
                           stride_dg, stride_low,
                           BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                           HAS_NEXT: tl.constexpr, WRITE_LOW: tl.constexpr, PRECISION: tl.constexpr):
        """One reverse time step t for a [BLOCK_B, BLOCK_H] tile: dh_t = dy_t + dgates_{t+1} U (the product
        over all 4H, skipped where not HAS_NEXT: the window's last step), then as the epilogue
        dc_t = dc + dh_t · dc_coef_t, dgates_t = (dc_t·k_i, dc_t·k_f, dc_t·k_g, dh_t·k_o) and dc ← dc_t · f_t
        (`loops._backward_coefficients` has k and dc_coef). dg_next [B,4H] (the products' dtype); u [4H,H]
        (weight_hh, element (k, n) at u_ptr + k·stride_uk + n); dy, dc_coef, f, dc [B,H] fp32; coef,
        dg [B,4H] fp32; dg_low [B,4H] (WRITE_LOW). Each program writes only its own rows and units."""
        rows, units, rmask, umask = _tile(B, H, BLOCK_B, BLOCK_H)
        mask = rmask[:, None] & umask[None, :]
        dh = tl.load(dy_ptr + rows[:, None] * stride_dy + units[None, :], mask=mask, other=0.0)
        if HAS_NEXT:
            acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for k0 in range(0, 4 * H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < 4 * H
                a = tl.load(dg_next_ptr + rows[:, None] * stride_dgn + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                            other=0.0)
                w = tl.load(u_ptr + ks[:, None] * stride_uk + units[None, :], mask=kmask[:, None] & umask[None, :],
                            other=0.0)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
            dh += acc
        c_row = coef_ptr + rows[:, None] * stride_coef
        dct = tl.load(dc_ptr + rows[:, None] * stride_dc + units[None, :], mask=mask, other=0.0) + \
            dh * tl.load(dc_coef_ptr + rows[:, None] * stride_dcc + units[None, :], mask=mask, other=0.0)
        d_i = dct * tl.load(c_row + units[None, :], mask=mask, other=0.0)
        d_f = dct * tl.load(c_row + (H + units)[None, :], mask=mask, other=0.0)
        d_g = dct * tl.load(c_row + (2 * H + units)[None, :], mask=mask, other=0.0)
        d_o = dh * tl.load(c_row + (3 * H + units)[None, :], mask=mask, other=0.0)
        _store_gates(dg_ptr + rows[:, None] * stride_dg, H, units, d_i, d_f, d_g, d_o, mask)
        if WRITE_LOW:
            _store_gates(dg_low_ptr + rows[:, None] * stride_low, H, units, d_i, d_f, d_g, d_o, mask)
        f = tl.load(f_ptr + rows[:, None] * stride_f + units[None, :], mask=mask, other=0.0)
        tl.store(dc_ptr + rows[:, None] * stride_dc + units[None, :], dct * f, mask=mask)


def tiles(batch: int, hidden: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_K) for a [batch, hidden] step: at least 16 each (tl.dot's smallest), at
    most 64 streams, 32 units (four accumulators of [64, 32] fp32 per program) and 64 of the reduction
    per chunk. Untuned: chosen so that the cluster shape (128 × 2048) makes 2 × 64 = 128 programs, about
    one per SM of an H100/H200; a GPU session should tune them against gpu_check's profile."""
    def fit(n: int, top: int) -> int:
        return max(16, min(top, triton.next_power_of_2(n)))
    return fit(batch, 64), fit(hidden, 32), fit(hidden, 64)


def triton_forward(gates: Tensor, hs: Tensor, cs: Tensor, weight_hh: Tensor, mm, kernels: "Kernels") -> None:
    """The forward loop, one Triton launch per step (signature and contract: `lstm_dist.model.loops`):
    gates [T,B,4H] fp32 holds x Wᵀ + b and on return the activations; fills hs/cs [T+1,B,H] (index 0:
    the initial state). `mm`: the products' dtype under autocast (bf16), None for fp32."""
    steps, batch, four_h = gates.shape
    hid = four_h // 4
    op = mm or gates.dtype
    u_t = weight_hh.to(op).t()  # [H, 4H], a view: strides (1, H)
    low = None
    if mm is not None:
        low = torch.empty(2, batch, hid, device=gates.device, dtype=mm)  # h_{t-1} for step t: low[t % 2]
        low[0].copy_(hs[0])
    block_b, block_h, block_k = tiles(batch, hid)
    grid = (triton.cdiv(batch, block_b), triton.cdiv(hid, block_h))
    precision = "tf32" if (mm is None and kernels.tf32) else "ieee"
    for t in range(steps):
        h_in = hs[t] if low is None else low[t % 2]
        h_low = hs[t + 1] if low is None else low[(t + 1) % 2]
        lstm_forward_step[grid](h_in, u_t, gates[t], cs[t], cs[t + 1], hs[t + 1], h_low,
                                batch, hid, h_in.stride(0), u_t.stride(0), u_t.stride(1), gates.stride(1),
                                cs.stride(1), hs.stride(1), h_low.stride(0),
                                BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, WRITE_LOW=low is not None,
                                PRECISION=precision)


def triton_backward(gates: Tensor, hs: Tensor, cs: Tensor, dy: Tensor, dc: Tensor, dgates: Tensor,
                    weight_hh: Tensor, mm, kernels: "Kernels") -> None:
    """The backward loop, one Triton launch per reverse step (signature and contract: `lstm_dist.model.loops`):
    fills dgates [T,B,4H] and takes dc [B,H] from dc_T to dc_{-1} in place. The per-gate coefficients
    come first for the whole window (`loops._backward_coefficients`, as every other path)."""
    from lstm_dist.model.loops import _backward_coefficients

    steps, batch, four_h = gates.shape
    hid = four_h // 4
    coef, dc_coef = _backward_coefficients(gates, hs, cs)
    dy = dy.contiguous()  # may be an expanded view (e.g. from a sum): the kernel reads rows of unit stride
    given, dc = dc, dc.contiguous()  # likewise; written back at the end where it was a copy
    u = weight_hh.to(mm or gates.dtype).contiguous()  # [4H, H]
    low = None if mm is None else torch.empty(2, batch, four_h, device=gates.device, dtype=mm)
    f = gates[..., hid : 2 * hid]
    block_b, block_h, _ = tiles(batch, hid)
    block_k = max(16, min(64, triton.next_power_of_2(four_h)))
    grid = (triton.cdiv(batch, block_b), triton.cdiv(hid, block_h))
    precision = "tf32" if (mm is None and kernels.tf32) else "ieee"
    for t in range(steps - 1, -1, -1):
        has_next = t < steps - 1
        if low is None:
            dg_next, dg_low = dgates[min(t + 1, steps - 1)], dgates[t]
        else:
            dg_next, dg_low = low[(t + 1) % 2], low[t % 2]
        lstm_backward_step[grid](dg_next, u, dy[t], coef[t], dc_coef[t], f[t], dc, dgates[t], dg_low,
                                 batch, hid, dg_next.stride(0), u.stride(0), dy.stride(1), coef.stride(1),
                                 dc_coef.stride(1), f.stride(1), dc.stride(0), dgates.stride(1), dg_low.stride(0),
                                 BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, HAS_NEXT=has_next,
                                 WRITE_LOW=low is not None, PRECISION=precision)
    if dc is not given:
        given.copy_(dc)
