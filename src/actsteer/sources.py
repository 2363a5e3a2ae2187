"""Strength sources: what makes the strength a hook applies differ from its steering's λ.

A hook starts from the steering's λ (one number, or one per row) and hands it through its
sources in order. Each returns the strength for this call (the same tensor, or one that
masks rows or tokens, or one per token), or None when nothing is steered this call; the
transport (actsteer.transport) applies what comes out. A source given the same λ and output
shape returns the same tensor, so the transport keeps the coefficients it computed for it.

    InPhase          positions "prompt" / "generated": only passes of that phase
    LastPosition     positions "last": only each row's last token
    PromptEncoding   a pipeline's text encoder, "conditional" guidance: not the negative prompts
    ConditionalHalf  a denoiser's [unconditional; conditional] batch: the conditional half only
    BothHalves       "both" guidance with one λ per prompt: the same λ on both halves
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from actsteer.errors import ActSteerError
from actsteer.guidance import Guidance
from actsteer.transport import per_row_mismatch


class Source(Protocol):
    """The strength of this call from the strength so far and the output to steer."""

    def __call__(self, lam: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None: ...


class Memo:
    """The strength last made from one λ tensor and output shape, made again only when either
    changes (so the transport sees the very same tensor)."""

    def __init__(self) -> None:
        self.key: tuple[torch.Tensor, tuple[int, ...]] | None = None
        self.value = torch.zeros(())

    def get(
        self, lam: torch.Tensor, shape: tuple[int, ...], make: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        if self.key is None or self.key[0] is not lam or self.key[1] != shape:
            self.value, self.key = make(), (lam, shape)
        return self.value


class PassPhase:
    """Model-level pre-hook: is the current forward pass the prompt pass (nothing cached yet)?"""

    def __init__(self) -> None:
        self.prompt = True

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # newer, older transformers
        if cache is None:
            self.prompt = True
        elif hasattr(cache, "get_seq_length"):
            self.prompt = cache.get_seq_length() == 0
        else:  # legacy tuple of per-layer (key, value)
            self.prompt = len(cache) == 0 or cache[0][0].shape[-2] == 0


class InPhase:
    """λ in the passes of one phase (the prompt pass, or the generated tokens' passes)."""

    def __init__(self, phase: PassPhase, prompt: bool) -> None:
        self.phase = phase
        self.prompt = prompt

    def __call__(self, lam: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        return lam if self.phase.prompt == self.prompt else None


class LastPosition:
    """λ at the last position of each row of a (B, T, …) output, 0 at the others."""

    def __init__(self) -> None:
        self.memo = Memo()

    def __call__(self, lam: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        if a.ndim != 3:
            raise ActSteerError(
                f"positions='last' steers outputs of (batch, tokens, units), not of shape "
                f"{tuple(a.shape)}; use positions='all'"
            )
        rows, tokens = a.shape[:2]
        if lam.ndim == 1 and lam.shape[0] != rows:
            raise per_row_mismatch(lam.shape[0], rows)

        def last_only() -> torch.Tensor:
            per_token = torch.zeros(rows, tokens)
            per_token[:, -1] = lam
            return per_token

        return self.memo.get(lam, (rows, tokens), last_only)


class PromptEncoding:
    """λ while text encoder `component` encodes the prompts, nothing for negative prompts."""

    def __init__(self, guidance: Guidance, component: str) -> None:
        self.guidance = guidance
        self.component = component

    def __call__(self, lam: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        return None if self.guidance.negative_prompts(self.component) else lam


class ConditionalHalf:
    """On a denoiser's classifier-free-guidance batch [unconditional; conditional]: λ on the
    conditional half (one per row of it, if per row), 0 on the unconditional one."""

    def __init__(self, guidance: Guidance) -> None:
        self.guidance = guidance
        self.memo = Memo()

    def __call__(self, lam: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        if not self.guidance.split:
            return lam
        rows = a.shape[0]
        half = rows // 2
        if lam.ndim == 1 and lam.shape[0] != rows - half:
            raise per_row_mismatch(lam.shape[0], rows - half)
        return self.memo.get(
            lam, (rows,), lambda: torch.cat([torch.zeros(half), lam.expand(rows - half)])
        )


class BothHalves:
    """One λ per prompt on a denoiser whose batch holds both guidance halves (twice the rows):
    each half gets the prompts' λ."""

    def __init__(self) -> None:
        self.memo = Memo()

    def __call__(self, lam: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        if lam.ndim == 1 and a.shape[0] == 2 * lam.shape[0]:
            return self.memo.get(lam, (a.shape[0],), lambda: lam.repeat(2))
        return lam
