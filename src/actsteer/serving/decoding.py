"""One request's decoding: choosing each next token (greedy, or sampled with its own seeded
generator) and turning tokens into text (incremental detokenization, stop strings, EOS).

Both work on the request's own row only, so what it gets never depends on its batch-mates.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch


class Sampler:
    """Greedy at temperature 0; else softmax(logits / T) cut to the top-p nucleus, drawn with a
    generator seeded by the request's seed (a random one without)."""

    def __init__(self, temperature: float, top_p: float, seed: int | None) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.generator = torch.Generator().manual_seed(
            random.getrandbits(63) if seed is None else seed
        )

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token from one row's (V,) logits."""
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # keep the most likely tokens up to and including the one that reaches top_p
            outside = sorted_probs.cumsum(0) - sorted_probs >= self.top_p
            sorted_probs[outside] = 0
            return int(order[torch.multinomial(sorted_probs, 1, generator=self.generator)])
        return int(torch.multinomial(probs, 1, generator=self.generator))


class TextOutput:
    """Generated tokens as text: what is safe to emit after each token, and why it stops.

    Text that might still become a stop string, or an incomplete UTF-8 character, is held back
    until the next tokens decide it; a stop string ends the text before it.
    """

    def __init__(
        self, tokenizer: Any, max_tokens: int, stop: Sequence[str], eos_ids: set[int]
    ) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.eos_ids = eos_ids
        self.tokens: list[int] = []
        self.count = 0  # tokens generated, EOS included
        self.sent = 0  # characters emitted so far

    def add(self, token: int) -> tuple[str, str | None]:
        """Take the next token: (new text to emit, finish reason "stop"/"length" or None)."""
        self.count += 1
        if token in self.eos_ids:
            return self._flush(self._text()), "stop"
        self.tokens.append(token)
        text = self._text()
        cut = min((i for i in (text.find(s, max(self.sent - len(s), 0)) for s in self.stop)
                   if i >= 0), default=-1)  # fmt: skip
        if cut >= 0:
            return self._flush(text[:cut]), "stop"
        if len(self.tokens) >= self.max_tokens:
            return self._flush(text), "length"
        safe = len(text) - self._held_back(text)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its other bytes
            safe = min(safe, len(text) - 1)
        return self._flush(text[:safe]), None

    def _text(self) -> str:
        return str(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that begins a stop string."""
        return max(
            (n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
             if text.endswith(s[:n])),
            default=0,
        )  # fmt: skip

    def _flush(self, text: str) -> str:
        new = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return new
