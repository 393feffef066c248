"""The fast layer: one `torch.autograd.Function` per layer and window, with a hand-derived backward.

`lstm_layer_fast` computes the equations of `lstm_dist.model.cell` over a window of T steps with the
same parameters and numbers as `cell.lstm_layer_reference`. Forward: the input projection of the whole
window is one matrix product written into a preallocated gates buffer; per step only the recurrent
product (added in place) and the pointwise cell update, in the time loops of the kernel table's entry
in force (`lstm_dist.model.loops`, chosen by `Kernels.for_window`). Backward, derived by hand from the
equations, walking t = T-1 .. 0:

    dh_t  = dy_t + dgates_{t+1} U                    (recurrent product, written in place)
    do    = dh_t ⊙ tanh(c_t)
    dc_t  = dc_{t+1}·f_{t+1} + dh_t ⊙ o ⊙ (1 - tanh²(c_t))
    di = dc_t ⊙ g,  df = dc_t ⊙ c_{t-1},  dg = dc_t ⊙ i
    dgates_t = [di·i(1-i), df·f(1-f), dg·(1-g²), do·o(1-o)]     (through σ and tanh)

The factors that do not depend on the incoming gradient (σ', tanh', and the products with the other
gates) are computed for the whole window before the loop (`loops._backward_coefficients`), so a step
is the recurrent product and a few pointwise ops; after the loop the weight gradients are single
products over all T·B rows of the window: dW = dgates^T X, dU = dgates^T [h_{-1}, …, h_{T-2}],
db = Σ dgates, dX = dgates W. Gradients reach the initial state too: dh_{-1} = dgates_0 U,
dc_{-1} = dc_0 ⊙ f_0.

Where the CPU time goes, and what this layer does about it (numbers: this repo's bench, 2 cores):
- matrix products are ~80% of a window: the input product and the weight gradients are single big
  GEMMs over the window here; the per-step recurrent product is `loops.recurrent_product`;
- big buffers (gates, states, dgates: ~190 MB per window at batch 64 / hidden 512) are reused through
  `buffers.POOL` instead of being page-faulted in afresh every window (that alone was ~15% of a window);
- the bias rides in the input GEMM as a column of ones ([X | 1] [W | b]^T), so neither a broadcast
  copy of the bias over the window nor a separate column sum for db is needed.

Precision: the recurrent state (h, c), the gates and the cell update are always in the state's dtype
(fp32 in training). Under `torch.autocast` (bf16 on CUDA: `Kernels.autocast`) only the matrix products
run in the autocast dtype. Tensors inside are time-major ([T, B, ·]) so each step's slice is contiguous.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch
from torch import Tensor

from lstm_dist.model import graphs, products
from lstm_dist.model.buffers import POOL

if TYPE_CHECKING:  # annotations only: kernels.py imports this module
    from lstm_dist.model.kernels import Kernels


def _lowp_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The matmul dtype autocast asks for on this device, or None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class LSTMWindow(torch.autograd.Function):
    """One layer over one window: (x [T,B,E], h0, c0 [B,H], W, U, b) -> (y [T,B,H], c_T [B,H]).

    h_T is y[-1]. `lowp` is the dtype of the matrix products (None: the state's dtype); `kernels` (a
    `Kernels`) picks the time loops (`Kernels.for_window`) and whether they run in CUDA graphs
    (`lstm_dist.model.graphs`; only a window autograd records, `history`). Backward is derived by hand
    (see the module docstring).

    In the full-precision path the input gets a column of ones and W a column b ([W | b]), so the one
    input product also adds the bias and, in backward, the one weight product [X | 1]^T dgates also
    gives db as its last row (no separate broadcast copy or column sum over the window).
    The first layer may come as tokens instead (`Kernels.table_input`): x [T,B] token ids and, in W's
    place, the table [V,4H] = embedding · Wᵀ + b (bias None), so the window's input gates are the table's
    rows gathered straight into the gates buffer, and backward returns, in the table's place, dtable =
    Σ over each token's rows of dgates (autograd takes it on to the embedding, W and b through the
    table's own product).
    """

    @staticmethod
    def forward(ctx, x, h0, c0, weight_ih, weight_hh, bias, lowp, kernels, history):  # type: ignore[override]
        with torch.autocast(x.device.type, enabled=False):
            acc = c0.dtype
            tokens = not x.is_floating_point()  # the first layer's input as a table lookup (class docstring)
            steps, batch = x.shape[:2]
            n_in = 0 if tokens else x.shape[2]
            hid = weight_hh.shape[1]
            dev = x.device
            mm = lowp if lowp is not None and lowp != acc else None
            loops = kernels.for_window(dev.type, acc, mm is not None)
            static = graphs.SETS.take(x, weight_hh, acc, mm, kernels, history)  # None: no CUDA graph here
            if static is None:
                gates = POOL.empty((steps, batch, 4 * hid), acc, dev)
                hs = POOL.empty((steps + 1, batch, hid), acc, dev)  # hs[0] = h0, hs[t+1] = h_t
                cs = POOL.empty((steps + 1, batch, hid), acc, dev)  # cs[0] = c0
            else:  # the static buffers the recorded loops read and write (lstm_dist.model.graphs)
                gates, hs, cs = static.views()
            hs[0].copy_(h0)
            cs[0].copy_(c0)
            if tokens:  # the input gates are the table's rows: one gather, no product
                xa = x.reshape(steps * batch)
                torch.index_select(weight_ih.to(acc), 0, xa, out=gates.view(steps * batch, 4 * hid))
            elif mm is None:
                # [X | 1], rows unpadded: measured faster for dgates^T [X | 1] than 16-aligned rows
                xa = POOL.empty((steps * batch, n_in + 1), acc, dev)
                xa[:, :n_in].copy_(x.reshape(steps * batch, n_in))
                xa[:, n_in].fill_(1.0)
                wa = torch.cat([weight_ih.to(acc), bias.to(acc).unsqueeze(1)], dim=1)  # [4H, E+1]
                products.linear(kernels.products.input, wa.t(), steps * batch)(xa, None, gates.view(steps * batch, 4 * hid))
            else:
                xa = x
                gates.view(steps * batch, -1).copy_(torch.mm(x.reshape(steps * batch, n_in).to(mm), weight_ih.to(mm).t()))
                gates.add_(bias.to(acc))
            if static is None:
                loops.forward_loop(gates, hs, cs, weight_hh, mm, kernels)
            else:
                static.forward(loops, weight_hh, mm, kernels)
        ctx.save_for_backward(xa, weight_ih, weight_hh, gates, hs, cs)
        ctx.lowp = mm
        ctx.static = static
        ctx.kernels, ctx.loops = kernels, loops
        ctx.tokens = tokens
        ctx.dtypes = (x.dtype, h0.dtype, weight_ih.dtype, weight_hh.dtype, None if bias is None else bias.dtype)
        return hs[1:], cs[steps].clone()

    @staticmethod
    def backward(ctx, dy, dc_last):  # type: ignore[override]
        xa, weight_ih, weight_hh, gates, hs, cs = ctx.saved_tensors
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
            mdt = acc if mm is None else mm
            u = weight_hh.to(mdt)
            if ctx.static is None:
                dgates = POOL.empty(tuple(gates.shape), acc, gates.device)
                dc = dc_last.to(acc).clone()
                ctx.loops.backward_loop(gates, hs, cs, dy, dc, dgates, weight_hh, mm, ctx.kernels)
            else:  # the forward's set: its recorded backward loop (dgates is the set's, read below)
                dc = ctx.static.backward(ctx.loops, dy, dc_last.to(acc), mm, ctx.kernels)
                dgates = ctx.static.dgates
            # the weight gradients: single products over all T*B rows of the window
            dg2 = dgates.view(steps * batch, four_h)
            dg_m = dg2 if mm is None else dg2.to(mm)
            if need_x:  # dX = dgates W, by the machine's implementation where fp32 on the CPU
                dx = products.linear(ctx.kernels.products.grad_x, weight_ih.to(mdt), steps * batch)(dg_m, None, None)
                dx = dx.view(steps, batch, n_in)
            if need_h0:
                dh0 = torch.mm(dg_m[:batch], u)
            prods = ctx.kernels.products if mm is None and acc == torch.float32 and dy.device.type == "cpu" else None
            if need_wh:  # dU = dgates^T [h_{-1} .. h_{T-2}], in the operand order measured faster (products)
                dw_hh = products.transposed_product(prods.grad_u if prods else "blas", dg_m,
                                                    hs[:steps].view(steps * batch, hid).to(mdt))
            if ctx.tokens:  # the table's gradient: each token's rows of dgates summed into its row
                if need_wi:
                    dw_ih = torch.zeros(weight_ih.shape, dtype=acc, device=dg2.device).index_add_(0, xa, dg2)
            elif mm is None:
                if need_wi or need_b:
                    # [X | 1]^T dgates = [dW | db]^T ([E+1, 4H]), in the operand order measured faster on
                    # this machine (products.grad_w). dW is handed back as a transposed view.
                    dwa_t = products.transposed_product(prods.grad_w if prods else "blas", xa, dg2)
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
            None,
        )


def lstm_layer_fast(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Optional[Tensor],
                    kernels: "Kernels") -> Tuple[Tensor, Tensor, Tensor]:
    """A layer over a window with the hand-written backward, the time loops of `kernels`' entry:
    x [T,B,E], h0/c0 [B,H], W [4H,E], U [4H,H], b [4H] -> (y [T,B,H], h_T, c_T), in c0's dtype. Or, for
    the first layer by table (`Kernels.table_input`): x [T,B] token ids, W the table [V,4H] (embedding ·
    Wᵀ + b) and b None."""
    lowp = _lowp_dtype(x.device)
    # whether autograd records this window (inside the Function's forward grad mode is always off)
    history = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                              for t in (x, h0, c0, weight_ih, weight_hh, bias))
    y, c_last = LSTMWindow.apply(x, h0, c0, weight_ih, weight_hh, bias, lowp, kernels, history)
    return y, y[-1], c_last
