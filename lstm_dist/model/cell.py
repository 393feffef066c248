"""The LSTM cell's equations, written once, and the reference path: a layer step by step under autograd.

The cell (one layer, one time step; x the input, (h, c) the carried state, ⊙ the elementwise product):

    i  = σ(W_i x + U_i h + b_i)          input gate
    f  = σ(W_f x + U_f h + b_f)          forget gate
    g  = tanh(W_g x + U_g h + b_g)       candidate cell
    o  = σ(W_o x + U_o h + b_o)          output gate
    c' = f ⊙ c + i ⊙ g
    h' = o ⊙ tanh(c')

Weights: one [4H, E] input matrix W, one [4H, H] recurrent matrix U and one [4H] bias per layer, the
gates stacked in the order i, f, g, o (layout and initialisation: `lstm_dist.model.char_lstm`).

`cell_update` is these equations from the pre-activations; `lstm_cell` one step of them (what
`CharLSTM.step` samples with); `lstm_layer_reference` a layer over a window, one `lstm_cell` per step,
differentiated by autograd: the `reference` entry of the kernel table (`lstm_dist.model.kernels`),
against which every other path is checked. The fast paths (`lstm_dist.model.fast`) compute the same
equations with a hand-derived backward.

Precision: the state (h, c), the gates and the update are in the state's dtype (fp32 in training);
under `torch.autocast` only the two matrix products run in the autocast dtype.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

State = Tuple[Tensor, Tensor]


def cell_update(gates: Tensor, c: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The module docstring's equations from the pre-activations gates [B,4H] and c [B,H]:
    (i, f, g, o, c', tanh(c')), each [B,H]. The reference path, `CharLSTM.step` and the compiled
    forward step (`lstm_dist.model.loops`) all use it."""
    gi, gf, gg, go = gates.chunk(4, dim=1)
    i = torch.sigmoid(gi)
    f = torch.sigmoid(gf)
    g = torch.tanh(gg)
    o = torch.sigmoid(go)
    c_next = f * c + i * g
    return i, f, g, o, c_next, torch.tanh(c_next)


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor) -> State:
    """One step of the cell: (x [B,E], h [B,H], c [B,H]; W [4H,E], U [4H,H], b [4H]) -> (h', c'), each
    [B,H] in c's dtype."""
    gates = (F.linear(x, weight_ih) + F.linear(h, weight_hh)).to(c.dtype) + bias.to(c.dtype)
    _, _, _, o, c_next, tanh_c = cell_update(gates, c)
    return o * tanh_c, c_next


def lstm_layer_reference(
    x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """A layer over a window, step by step under autograd: x [T,B,E], h0/c0 [B,H] -> (y [T,B,H], h_T, c_T)."""
    h, c = h0, c0
    ys = []
    for t in range(x.shape[0]):
        h, c = lstm_cell(x[t], h, c, weight_ih, weight_hh, bias)
        ys.append(h)
    return torch.stack(ys), h, c
