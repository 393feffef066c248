"""The character-level model: embedding -> LSTM layers -> linear head, and `step()` for sampling.

The cell's equations and the reference path are `lstm_dist.model.cell`; which kernels compute a layer
is a `Kernels` (`lstm_dist.model.kernels`), chosen once by `choose_kernels` and held by `CharLSTM`,
which hands it to its layers. Here are the parameters and the model around the cell.

Weight layout (per layer k, the same as torch.nn.LSTM so weights copy over without reshuffling):

    cells.k.weight_ih  [4H, E_k]   rows stacked [W_i; W_f; W_g; W_o]   (E_0 = embedding, E_k = H for k > 0)
    cells.k.weight_hh  [4H, H]     rows stacked [U_i; U_f; U_g; U_o]
    cells.k.bias       [4H]        stacked [b_i; b_f; b_g; b_o]

so one matrix product gives all four gates' pre-activations: gates = x W^T + h U^T + b, and
gates[:, 0:H] is i, [H:2H] f, [2H:3H] g, [3H:4H] o. There is ONE bias per layer: torch.nn.LSTM has
two (b_ih and b_hh) that only ever appear summed, so to copy a torch.nn.LSTM use b = b_ih + b_hh.

Initialisation: every weight U(-1/√H, 1/√H) (what torch.nn.LSTM does, so the two start from the same
distribution), the bias 0 except the forget gate's, which is 1. With f ≈ σ(1) ≈ 0.73 at the start the
cell keeps most of its content from step to step, so gradients reach back across the window from the
first update instead of having to learn to remember first (Gers et al. 2000; Jozefowicz et al. 2015
found it closed most of the gap between the LSTM and later variants).

`CharLSTM` takes and returns batch-major tensors ([B, T]) like the data pipeline produces; inside,
the layers run time-major. The state (h, c) it returns is still attached to the window's graph:
`detach_state` cuts it before the next window (truncated BPTT).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_dist.config import ModelConfig, check_setting
from lstm_dist.model.cell import State, lstm_cell
from lstm_dist.model.kernels import Kernels

__all__ = ["CharLSTM", "LSTMLayer", "State", "detach_state"]


class LSTMLayer(nn.Module):
    """One LSTM layer's parameters (layout in the module docstring) and its window forward."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            self.weight_ih.uniform_(-bound, bound)
            self.weight_hh.uniform_(-bound, bound)
            self.bias.zero_()
            self.bias[self.hidden_size : 2 * self.hidden_size].fill_(1.0)  # forget gate

    def forward(self, x: Tensor, h0: Tensor, c0: Tensor, kernels: Kernels):
        """x [T,B,input_size], h0/c0 [B,H] -> (y [T,B,H], h_T, c_T), computed by `kernels`' entry."""
        return kernels.spec.layer(x, h0, c0, self.weight_ih, self.weight_hh, self.bias, kernels)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


def detach_state(state: Optional[State]) -> Optional[State]:
    """The state cut from the graph (truncated BPTT: the next window does not backprop into this one)."""
    if state is None:
        return None
    return tuple(s.detach() for s in state)  # type: ignore[return-value]


class CharLSTM(nn.Module):
    """Embedding -> `layers` LSTM layers -> linear head to the vocabulary.

    Dropout (p = `dropout`, training only) is applied to each layer's output: between layers and
    before the head, i.e. on every non-recurrent connection above the embedding, never on the
    recurrent (h, c) path (Zaremba et al. 2014). Dropping before the head too is deliberate: with
    one layer, "between layers only" would make the setting a silent no-op.

    `kernels` (default: `Kernels()`, the eager steps, which run anywhere) says which kernels the layers
    run; `choose_kernels` makes the one a run uses, and `from_config` takes it. The sizes are checked
    as the config's `model.*` settings are (`lstm_dist.config.check_setting`: a UserError naming the key).

    state_dict keys (independent of the kernels): embed.weight, cells.{k}.weight_ih,
    cells.{k}.weight_hh, cells.{k}.bias, head.weight, head.bias.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding: int,
        hidden: int,
        layers: int,
        dropout: float = 0.0,
        *,
        kernels: Optional[Kernels] = None,
    ) -> None:
        super().__init__()
        if int(vocab_size) < 1:  # not a setting: the vocabulary comes with the corpus
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.embedding_size = check_setting("model.embedding", embedding)
        self.hidden_size = check_setting("model.hidden", hidden)
        self.num_layers = check_setting("model.layers", layers)
        self.dropout = check_setting("model.dropout", dropout)
        self.kernels = Kernels() if kernels is None else kernels
        self.embed = nn.Embedding(self.vocab_size, self.embedding_size)
        self.cells = nn.ModuleList(
            LSTMLayer(self.embedding_size if k == 0 else self.hidden_size, self.hidden_size)
            for k in range(self.num_layers)
        )
        self.head = nn.Linear(self.hidden_size, self.vocab_size)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, vocab_size: int, *, kernels: Kernels) -> "CharLSTM":
        """The model a `ModelConfig` describes (embedding, hidden, layers, dropout), running `kernels`
        (`choose_kernels` of the same config: ValueError if they implement another `model.impl`)."""
        if kernels.spec.impl != model_cfg.impl:
            raise ValueError(f"kernels {kernels.name!r} implement model.impl={kernels.spec.impl}, "
                             f"the config asks for {model_cfg.impl}")
        return cls(vocab_size, embedding=model_cfg.embedding, hidden=model_cfg.hidden, layers=model_cfg.layers,
                   dropout=model_cfg.dropout, kernels=kernels)

    def init_state(self, batch: int, device: Optional[torch.device | str] = None) -> State:
        """Zeros (h, c), each [layers, batch, hidden], fp32."""
        if device is None:
            device = self.head.weight.device
        shape = (self.num_layers, batch, self.hidden_size)
        return (
            torch.zeros(shape, device=device, dtype=torch.float32),
            torch.zeros(shape, device=device, dtype=torch.float32),
        )

    def forward(self, x: Tensor, state: Optional[State] = None) -> Tuple[Tensor, State]:
        """x [B,T] token ids, state (h, c) [layers,B,H] or None -> (logits [B,T,V], new state).

        The logits are a batch-major view of the head's time-major output: the loss's reshape copies
        them once, where a copy here too measured ~2% of a step at 2 x 256, batch 32."""
        if x.dim() != 2:
            raise ValueError(f"x must be [batch, time], got shape {tuple(x.shape)}")
        batch = x.shape[0]
        if state is None:
            state = self.init_state(batch, x.device)
        h0, c0 = state
        tokens = x.t()  # [T,B], time-major inside
        table = self.kernels.spec.impl == "fast" and self.kernels.table_input(self.vocab_size, tokens.numel())
        inp = tokens if table else self.embed(tokens)  # [T,B] ids for the first layer by table, else [T,B,E]
        hs, cs = [], []
        for k, cell in enumerate(self.cells):
            if k == 0 and table:  # its input gates from one [V,4H] table, embedding · Wᵀ + b (Kernels.table_input)
                w = torch.addmm(cell.bias, self.embed.weight, cell.weight_ih.t())
                inp, h_k, c_k = self.kernels.spec.layer(inp, h0[0].float(), c0[0].float(), w, cell.weight_hh, None,
                                                        self.kernels)
            else:
                inp, h_k, c_k = cell(inp, h0[k].float(), c0[k].float(), self.kernels)
            hs.append(h_k)
            cs.append(c_k)
            if self.dropout > 0.0:  # on each layer's output: between layers and before the head
                inp = F.dropout(inp, self.dropout, self.training)
        logits = self.head(inp).transpose(0, 1)
        return logits, (torch.stack(hs), torch.stack(cs))

    @torch.no_grad()
    def step(self, token: Tensor, state: Optional[State] = None) -> Tuple[Tensor, State]:
        """Advance one character (sampling; no autograd, no dropout): token [B] -> (logits [B,V], state)."""
        if state is None:
            state = self.init_state(token.shape[0], token.device)
        h0, c0 = state
        inp = self.embed(token)
        hs, cs = [], []
        for k, cell in enumerate(self.cells):
            h_k, c_k = lstm_cell(inp, h0[k], c0[k], cell.weight_ih, cell.weight_hh, cell.bias)
            hs.append(h_k)
            cs.append(c_k)
            inp = h_k
        return self.head(inp), (torch.stack(hs), torch.stack(cs))
