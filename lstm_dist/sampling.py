"""Drawing text from a CharLSTM: the prompt once through `forward`, then one `step` per character.

The carried (h, c) makes the cost of each new character constant, however long the text grows.
Used by `python -m lstm_dist.generate` and by the training loop's samples at each evaluation; it
draws from its own `torch.Generator`, never the global one, so sampling during training leaves the
training run's random stream (dropout) untouched.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Scaled and truncated logits [B, V]: temperature, then the k most likely, then the nucleus of mass top_p."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the most likely always stays.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    length: int,
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield `length` tensors of shape [num_samples]: the next character id of every sample."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one character")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.tensor(prompt_ids, dtype=torch.long, device=device).unsqueeze(0).expand(num_samples, -1)
        state = model.init_state(num_samples, device=device)
        logits, state = model(x.contiguous(), state)
        last = logits[:, -1, :]
        for _ in range(length):
            if temperature == 0:
                token = torch.argmax(last, dim=-1)
            else:
                probs = torch.softmax(filter_logits(last, temperature, top_k, top_p), dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            yield token
            last, state = model.step(token, state)
    finally:
        model.train(was_training)


def sample_text(model: torch.nn.Module, vocab, prompt: str, length: int, *, temperature: float = 0.8,
                seed: int = 0, on_text: Callable[[str], None] | None = None) -> str:
    """One sample as text (used for the training log)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    ids = [int(t[0]) for t in generate_ids(model, list(map(int, vocab.encode(prompt))), length,
                                           temperature=temperature, generator=gen)]
    text = vocab.decode(ids)
    if on_text is not None:
        on_text(text)
    return text
