"""The forward time loop as one Triton kernel per step: the recurrent product for the four gates of a
tile of hidden units with the cell update as its epilogue (#19, its first part; opt-in).

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

The backward loop of this entry is the compiled one (`loops.compiled_backward`): the loop contract
(`loops`' module docstring) is the same, so the two combine. Programs of one launch never wait for
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
    from lstm_dist.model import loops
    from lstm_dist.model.kernels import Kernels

    g = torch.Generator(device="cpu").manual_seed(0)
    gates = torch.randn(2, batch, 4 * hidden, generator=g).to(device)
    u = (torch.randn(4 * hidden, hidden, generator=g) * hidden ** -0.5).to(device)
    hs, cs = torch.zeros(3, batch, hidden, device=device), torch.zeros(3, batch, hidden, device=device)
    ours, eager = [gates.clone(), hs.clone(), cs.clone()], [gates.clone(), hs.clone(), cs.clone()]
    try:
        triton_forward(*ours, u, None, Kernels("eager"))
    except Exception as exc:  # noqa: BLE001 - any failure to build or launch means: not this path
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    loops.eager_forward(*eager, u, None, Kernels("eager"))
    worst = max(float((a - b).abs().max()) for a, b in zip(ours, eager))  # activations, h, c: all within [-1, 1]
    # a check for gross errors (a wrong tile or stride), not rounding: the eager product may run in TF32
    return None if worst < 1e-2 else f"its 2-step probe differs from the eager loops by {worst:.3g}"


if triton is not None:

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def lstm_forward_step(h_ptr, u_ptr, gates_ptr, c_prev_ptr, c_ptr, h_out_ptr, h_low_ptr,
                          B, H, stride_h, stride_uk, stride_un, stride_g, stride_c, stride_hout, stride_low,
                          BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                          WRITE_LOW: tl.constexpr, PRECISION: tl.constexpr):
        """One time step for a [BLOCK_B, BLOCK_H] tile (module docstring). h [B,H] (h_{t-1}, the products'
        dtype); u [H,4H] (Uᵀ, element (k, n) at u_ptr + k·stride_uk + n·stride_un); gates [B,4H] fp32
        (in: x Wᵀ + b; out: the activations); c_prev, c, h_out [B,H] fp32; h_low [B,H] (WRITE_LOW)."""
        pid_b = tl.program_id(0)
        pid_h = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        rmask = rows < B
        umask = units < H
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
        tl.store(g_row + units[None, :], i, mask=mask)
        tl.store(g_row + (H + units)[None, :], f, mask=mask)
        tl.store(g_row + (2 * H + units)[None, :], g, mask=mask)
        tl.store(g_row + (3 * H + units)[None, :], o, mask=mask)
        tl.store(c_ptr + rows[:, None] * stride_c + units[None, :], c, mask=mask)
        tl.store(h_out_ptr + rows[:, None] * stride_hout + units[None, :], h, mask=mask)
        if WRITE_LOW:
            tl.store(h_low_ptr + rows[:, None] * stride_low + units[None, :], h.to(h_low_ptr.dtype.element_ty),
                     mask=mask)


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
