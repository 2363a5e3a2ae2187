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
    Gated            the steering's gate (actsteer.gates): λ times g per token
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from actsteer.errors import ActSteerError
from actsteer.gates import Gate, GateSettings, folded
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
    """Model-level pre-hook: is the current forward pass the prompt pass (nothing cached yet)?
    And its attention mask, where the call gives one (left padding is not a token).

    A pass that does not continue the last one where it ended (a cached prefix reused, e.g. a
    few-shot prefix copied under each batch of questions) tells the carried gates (`carriers`)
    where it starts and how many rows it has, so they resume from that point's sums.
    """

    def __init__(self) -> None:
        self.prompt = True
        self.mask: torch.Tensor | None = None
        self.end: int | None = 0  # the cache length after the last pass (None: not known)
        self.carriers: list[Gated] = []

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # newer, older transformers
        if cache is None:
            start = 0
        elif hasattr(cache, "get_seq_length"):
            start = int(cache.get_seq_length())
        else:  # legacy tuple of per-layer (key, value)
            start = 0 if len(cache) == 0 else int(cache[0][0].shape[-2])
        self.prompt = start == 0
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None and args and isinstance(args[0], torch.Tensor):
            tokens = args[0]
        if not isinstance(tokens, torch.Tensor) or tokens.ndim < 2:
            self.end = None
            return
        if not self.prompt and self.end is not None:
            for gate in self.carriers:
                gate.resume(start, self.end, tokens.shape[0])
        self.end = start + tokens.shape[1]


def holds_prompt_decisions(model: nn.Module) -> bool:
    """Whether a steering applied to `model` has prompt gates, which decide once from a whole
    prompt: a prefix cached apart from the rest of a prompt would make them decide from the
    prefix alone."""
    return any(
        isinstance(hook, PassPhase) and any(g.settings.kind == "prompt" for g in hook.carriers)
        for hook in model._forward_pre_hooks.values()
    )


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


def prompt_scores(
    score: torch.Tensor, real: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) scores of a prompt pass as a gate of `kind` sees them (a token's own, the running
    mean, the prompt's mean; `real` is 0 on padding), with each row's sum and count of real
    tokens, which generated tokens' passes carry on from."""
    total, count = (score * real).cumsum(1), real.cumsum(1)
    if kind == "prompt":
        seen = (total[:, -1] / count[:, -1].clamp_min(1)).unsqueeze(1).expand_as(score)
    elif kind == "context":
        seen = total / count.clamp_min(1)
    else:
        seen = score
    return seen, total[:, -1], count[:, -1]


class Gated:
    """λ times the gate g of this module's activations (actsteer.gates), per token.

    kind "token": each token's own score. "context": the running mean of the scores of the
    sequence so far, padding left out, carried from the prompt pass through the generated
    tokens' passes (per row, reset by every prompt pass). "prompt": the mean score of the
    prompt's real tokens, held for the generated tokens. Without a pass phase (no model
    pre-hook) every forward is a prompt pass. `last` keeps the last gate values (telemetry).
    """

    def __init__(self, gate: Gate, settings: GateSettings, phase: PassPhase | None) -> None:
        self.settings = settings
        self.phase = phase
        self.weight, self.bias = folded(gate, settings)  # running means commute with it
        self.total: torch.Tensor | None = None  # per row: the z's sum so far
        self.count: torch.Tensor | None = None  # per row: how many real tokens so far
        self.after_prompt: tuple[int | None, torch.Tensor, torch.Tensor] | None = None
        self.last: torch.Tensor | None = None
        if phase is not None and settings.kind != "token":
            phase.carriers.append(self)

    def place(self, device: torch.device) -> None:
        """Keep the folded weight and bias on `device` (where the activations are)."""
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)

    def __call__(self, lam: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.weight.device != a.device:
            self.place(a.device)
        flat = a.reshape(-1, a.shape[-1]).float()
        z = torch.addmv(self.bias, flat, self.weight).view(a.shape[:-1])
        if self.settings.kind != "token":
            z = self._carried(z, a)
        g = torch.sigmoid(z)
        self.last = g
        if lam.ndim == 0:  # a CPU number multiplies a tensor on any device
            return g * lam
        if lam.ndim == 1 and g.ndim == 2:
            return lam.to(g.device).view(-1, 1) * g
        return g * lam.to(g.device)

    def resume(self, start: int, end: int, rows: int) -> None:
        """Before a pass that starts at cache length `start` with `rows` rows (the last pass
        ended at `end`): carry on from the sums at `start` — the last pass's, or the prompt
        pass's where the cache was rewound to the prompt — each row's repeated where a cache
        was (`batch_repeat_interleave`); none known (the next pass refuses) otherwise."""
        if start == end and self.total is not None and self.count is not None:
            sums = (self.total, self.count)
        elif self.after_prompt is not None and self.after_prompt[0] == start:
            sums = self.after_prompt[1:]
        else:
            self.total = self.count = None
            return
        known = sums[0].shape[0]
        if known == rows and sums[0] is self.total:
            return
        if rows % known:
            self.total = self.count = None
            return
        self.total, self.count = (t.repeat_interleave(rows // known).contiguous() for t in sums)

    def _carried(self, score: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The running mean (context) or the prompt's mean (prompt) of (B, T) scores."""
        if a.ndim != 3:
            raise ActSteerError(
                f"a {self.settings.kind} gate follows a sequence; it steers outputs of (batch, "
                f"tokens, units), not of shape {tuple(a.shape)}: use a token gate"
            )
        prompt = self.phase is None or self.phase.prompt
        if prompt:
            mask = self.phase.mask if self.phase is not None else None
            real = (
                mask.to(score.device, score.dtype)
                if mask is not None and mask.shape == score.shape
                else torch.ones_like(score)
            )
            seen, total, count = prompt_scores(score, real, self.settings.kind)
            # owned, contiguous: the fused kernel's gated hook carries them on in place
            self.total, self.count = total.contiguous(), count.contiguous()
            if self.phase is not None:
                self.after_prompt = (self.phase.end, self.total.clone(), self.count.clone())
            return seen
        if self.total is None or self.count is None or self.total.shape[0] != score.shape[0]:
            raise ActSteerError(
                "a context or prompt gate carries each row's scores from its prompt pass; this "
                "pass has rows it did not see (beam search or a batch that changes rows) or "
                "continues a cache from a point it did not see: use a token gate"
            )
        if self.settings.kind == "prompt":
            return (self.total / self.count.clamp_min(1)).unsqueeze(1).expand_as(score)
        total = self.total.unsqueeze(1) + score.cumsum(1)
        count = self.count.unsqueeze(1) + torch.arange(1, score.shape[1] + 1, device=score.device)
        self.total, self.count = total[:, -1].contiguous(), count[:, -1].contiguous()
        return total / count
