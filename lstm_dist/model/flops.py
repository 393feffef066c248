"""The model's floating-point operations per token: the one count behind every MFU the package reports
(training's log line and `perf/mfu`, `python -m lstm_dist.bench`, tests/gpu_check.sh).

Only the matrix products are counted, as model FLOPs utilisation counts them (PaLM's MFU: the FLOPs the
model needs, not what the hardware happened to run): a product of an [n, k] by a [k, m] matrix is
2·n·k·m FLOPs (a multiply and an add per term). Per token, the forward pass of

- LSTM layer k (input width E_k: the embedding for k = 0, the hidden width above) runs x·W_ihᵀ with
  W_ih [4H, E_k] and h·W_hhᵀ with W_hh [4H, H]: 2·4H·(E_k + H);
- the head (`CharLSTM.head`, [V, H]) runs h·Wᵀ: 2·H·V;
- the embedding is a lookup (no product); the cell's pointwise update (a few dozen operations per
  unit) and the softmax are left out, as they are in every MFU.

Training runs each product three times: forward, then the input gradient and the weight gradient in
backward (each the same size), so 3 × forward. Recomputation (none here) would not be counted either.
"""

from __future__ import annotations


def forward_flops_per_token(embedding: int, hidden: int, layers: int, vocab: int = 0) -> int:
    """Matrix-product FLOPs of one token's forward pass: Σ_k 2·4H·(E_k + H) over the `layers` LSTM layers
    (E_0 = `embedding`, E_k = `hidden` above), plus the head's 2·H·V where `vocab` V > 0 (0 counts the
    layers alone, as the layer bench times them). Raises ValueError on a width or count below 1 (or a
    negative `vocab`)."""
    if embedding < 1 or hidden < 1 or layers < 1 or vocab < 0:
        raise ValueError(f"no such model: embedding={embedding} hidden={hidden} layers={layers} vocab={vocab}")
    lstm = sum(2 * 4 * hidden * ((embedding if k == 0 else hidden) + hidden) for k in range(layers))
    return lstm + 2 * hidden * vocab


def training_flops_per_token(embedding: int, hidden: int, layers: int, vocab: int = 0) -> int:
    """Matrix-product FLOPs of one token's training step, forward and backward: 3 × `forward_flops_per_token`
    (backward runs two products of the same size per forward product: the input and the weight gradients).
    Same arguments and errors."""
    return 3 * forward_flops_per_token(embedding, hidden, layers, vocab)
