"""Drawing text from a CharLSTM: the prompt once through `forward`, then one `step` per character.

The carried (h, c) makes the cost of each new character constant, however long the text grows.
Used by `python -m lstm_dist.generate` and by the training loop's samples at each evaluation; it
draws from its own `torch.Generator`, never the global one, so sampling during training leaves the
training run's random stream (dropout) untouched.

The per-character loop is kept to a handful of tensor operations, none of which waits for the
device: `step()`, then the choice of the next character by the Gumbel-max trick (argmax of the
logits plus temperature-scaled Gumbel noise is a draw from softmax(logits / temperature), with no
softmax, no normalisation and no multinomial call), the noise drawn in blocks of steps from the
generator ahead of time. The chosen ids are written into a preallocated buffer and go to the host
(and to text) in chunks, every `emit_every_s` seconds, not one by one.
"""

from __future__ import annotations

import codecs
import math
import time
from typing import Iterator

import torch

from lstm_dist.data.corpus import lacking_note, text_from_string

# How many steps' noise to draw at once: a block holds at most this many floats (4 MB).
_NOISE_FLOATS = 1 << 20
_MAX_BLOCK = 256


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Scaled and truncated logits [B, V]: temperature, then the k most likely, then the nucleus of mass top_p.

    The definition of what `Sampler` draws from (softmax of these); `Sampler` gets there without
    materialising it. Kept as the readable reference.
    """
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool).scatter(-1, order, outside_top_p(sorted_logits, top_p))
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def outside_top_p(sorted_scaled_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """True for the ids outside the nucleus, given logits (already divided by the temperature) sorted
    largest first: an id is dropped when the mass before it already reaches top_p, so the most likely
    always stays."""
    probs = torch.softmax(sorted_scaled_logits, dim=-1)
    return (torch.cumsum(probs, dim=-1) - probs) >= top_p


SETTING_NAMES = ("temperature", "top_k", "top_p")
# The temperature of the samples in the training log and of `generate` unless --temperature says otherwise.
DEFAULT_TEMPERATURE = 0.8


def check_settings(temperature: float, top_k: int, top_p: float, names: tuple[str, str, str] = SETTING_NAMES) -> None:
    """Refuse settings that draw nothing sensible, naming them as the caller calls them (`names`:
    the keyword arguments, or the command-line flags)."""
    if not temperature >= 0.0 or not math.isfinite(temperature):  # also refuses NaN and inf
        raise ValueError(f"{names[0]} must be a number >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"{names[1]} must be >= 0 (0 keeps every character), got {top_k}")
    if not 0.0 < top_p <= 1.0:  # also refuses NaN
        raise ValueError(f"{names[2]} must be in (0, 1] (1 keeps every character), got {top_p}")


class Sampler:
    """Chooses the next id of each of `batch` streams from logits [batch, vocab_size].

    temperature 0: the most likely id (greedy). Otherwise a draw from softmax(filter_logits(...)):
    with top_k the k largest logits are kept (ties at the k-th broken by position, so exactly k),
    with top_p the smallest set of the most likely ids whose probability reaches top_p. Draws
    use the Gumbel-max trick; the noise comes from `generator` in blocks of steps, so the same
    generator state, batch and vocabulary give the same draws whatever the length asked for.
    """

    def __init__(self, batch: int, vocab_size: int, device: torch.device | str, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None) -> None:
        check_settings(temperature, top_k, top_p)
        self.batch, self.vocab_size, self.device = batch, vocab_size, torch.device(device)
        self.temperature, self.top_p, self.generator = float(temperature), float(top_p), generator
        self.top_k = top_k if 0 < top_k < vocab_size else 0
        self.width = self.top_k or vocab_size  # candidates per stream that get noise
        self.block = max(1, min(_MAX_BLOCK, _NOISE_FLOATS // (batch * self.width)))
        self._noise: tuple[torch.Tensor, ...] = ()
        self._next = 0
        self._scratch = torch.empty(batch, self.width, device=self.device)
        self._choice = torch.empty(batch, dtype=torch.long, device=self.device)

    def _draw_noise(self) -> None:
        # temperature * Gumbel noise T*G, G = -log(-log U): argmax(l + T*G) = argmax(l/T + G) is a draw
        # from softmax(l/T). (From uniforms: about 5x cheaper on the CPU than exponential_.)
        u = torch.empty(self.block, self.batch, self.width, device=self.device)
        torch.rand(u.shape, generator=self.generator, device=self.device, out=u)
        self._noise = u.clamp_min_(torch.finfo(u.dtype).tiny).log_().neg_().log_().mul_(-self.temperature).unbind(0)
        self._next = 0

    def __call__(self, logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The chosen ids [batch] (int64), written into `out` when given."""
        if out is None:
            out = torch.empty(self.batch, dtype=torch.long, device=self.device)
        if self.temperature == 0.0:
            return torch.argmax(logits, dim=-1, out=out)
        if self._next == len(self._noise):
            self._draw_noise()
        noise = self._noise[self._next]
        self._next += 1
        if not self.top_k and self.top_p >= 1.0:
            return torch.argmax(torch.add(logits, noise, out=self._scratch), dim=-1, out=out)
        if self.top_k:
            values, order = torch.topk(logits, self.top_k, dim=-1)  # sorted, largest first
        else:
            values, order = torch.sort(logits, dim=-1, descending=True)
        values = values.float()
        if self.top_p < 1.0:
            values = values.masked_fill_(outside_top_p(values / self.temperature, self.top_p), float("-inf"))
        # the noise is iid per candidate, so it may be added in sorted order
        pick = torch.argmax(values.add_(noise), dim=-1, out=self._choice)
        return torch.gather(order, 1, pick.unsqueeze(1), out=out.unsqueeze(1)).squeeze(1)


@torch.inference_mode()
def generate(model: torch.nn.Module, prompt_ids: list[int], length: int, *, num_samples: int = 1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, emit_every_s: float = 0.05) -> Iterator[torch.Tensor]:
    """The next `length` ids of `num_samples` continuations of the prompt, as CPU int64 tensors
    [n, num_samples] in order (together n sums to `length`), one every `emit_every_s` seconds or so.

    The prompt goes through `model.forward` once (at batch 1; its state is then copied to every
    sample), then each character is one `model.step` on the carried state.
    """
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one character")
    if length < 0 or num_samples < 1:
        raise ValueError(f"length must be >= 0 and num_samples >= 1, got {length} and {num_samples}")
    device = next(model.parameters()).device
    sampler = Sampler(num_samples, model.vocab_size, device, temperature=temperature, top_k=top_k, top_p=top_p,
                      generator=generator)
    if length == 0:
        return
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        logits, (h, c) = model(x, model.init_state(1, device))
        last = logits[:, -1, :].expand(num_samples, -1)
        state = (h.expand(-1, num_samples, -1).contiguous(), c.expand(-1, num_samples, -1).contiguous())
        chunk = min(length, 1024)
        buf = torch.empty(chunk, num_samples, dtype=torch.long, device=device)
        rows = buf.unbind(0)
        filled = 0  # rows of buf in use
        next_emit = time.perf_counter() + emit_every_s
        for t in range(length):
            token = sampler(last, out=rows[filled])
            filled += 1
            if t + 1 < length:
                last, state = model.step(token, state)
            if filled == chunk or t + 1 == length or time.perf_counter() >= next_emit:
                yield buf[:filled].to("cpu", copy=True)
                filled = 0
                next_emit = time.perf_counter() + emit_every_s
    finally:
        model.train(was_training)


class TextDecoder:
    """Ids to text, piece by piece. Bytes vocabulary: an incremental UTF-8 decoder, so a character
    whose bytes arrive in different pieces is never split, and invalid sequences become U+FFFD.
    Chars vocabulary: one character per id (the unknown id is U+FFFD)."""

    def __init__(self, vocab) -> None:
        self.vocab = vocab
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if vocab.kind == "bytes" else None

    def decode(self, ids: list[int], final: bool = False) -> str:
        if self._utf8 is None:
            return self.vocab.decode(ids)
        return self._utf8.decode(bytes(ids), final=final)


def sample_text(model: torch.nn.Module, vocab, prompt: str, length: int, *, temperature: float = DEFAULT_TEMPERATURE,
                seed: int = 0) -> str:
    """One sample as text (used for the training log): the `length` ids after `prompt`, decoded.
    The prompt is taken as given (`lstm_dist.data.corpus.text_from_string`), as `generate --prompt` takes
    it; characters a chars vocabulary lacks become its unknown id (`sample_prompt_note` says which)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    prompt = text_from_string(prompt, f"the training sample prompt {prompt!r}")
    chunks = list(generate(model, list(map(int, vocab.encode(prompt))), length, temperature=temperature,
                           generator=gen))
    ids = torch.cat(chunks)[:, 0].tolist() if chunks else []
    return vocab.decode(ids)


def sample_prompt_note(vocab, prompt: str) -> str | None:
    """None when `vocab` encodes every character of training's sample prompt; else the one line (no
    `warning:` prefix) that names the prompt, the characters the run's chars vocabulary lacks, and
    what the samples make of them, e.g. "the training sample prompt 'The ' has 1 character(s) the
    corpus's chars vocabulary lacks: 'T'; the samples logged during training read them as its unknown
    id". The bytes vocabulary lacks nothing."""
    lacking = vocab.unknown(prompt)
    if not lacking:
        return None
    return lacking_note(f"the training sample prompt {prompt!r}", lacking,
                        "the samples logged during training read them as its unknown id",
                        vocab_name="the corpus's chars vocabulary")
