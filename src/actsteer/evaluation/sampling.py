"""Sampled continuations of many prompts at several strengths, in batched generate calls.

Each call carries a chunk of prompts × all strengths, one per-row λ per batch row (via
`actsteer.generation.generate_grid`), so a λ grid costs about what one strength costs at the
same batch size. Sampling is seeded per chunk inside a forked RNG: reruns with the same
prompts, strengths and batch size give the same texts, and the caller's RNG is untouched.
(A row's random draws depend on its batch, so the same λ in a different grid may differ.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from actsteer.errors import ActSteerError
from actsteer.generation import generate_grid
from actsteer.steering import Steering
from actsteer.tree import model_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Sampling:
    """Generation settings; the defaults are the AcT paper's RTP settings."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 0.3
    repetition_penalty: float = 1.2
    do_sample: bool = True
    chat: bool = False  # prompts as user turns of the tokenizer's chat template

    def as_dict(self) -> dict[str, float | int | bool]:
        """The settings, as recorded and as generate_grid takes them."""
        return asdict(self)

    @classmethod
    def coerce(cls, value: Sampling | Mapping[str, Any] | None) -> Sampling:
        """A Sampling from itself, a dict of its fields (e.g. from JSON), or None (defaults)."""
        if value is None:
            return PAPER_SAMPLING
        if isinstance(value, Sampling):
            return value
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ActSteerError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
        return cls(**value)


#: The AcT paper's generation settings for RealToxicityPrompts.
PAPER_SAMPLING = Sampling()


def sample_grid(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    strengths: Sequence[float],
    steering: Steering | None = None,
    *,
    sampling: Sampling | Mapping[str, Any] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    support: str | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> list[list[str]]:
    """texts[p][s]: the continuation of prompts[p] at strengths[s] (the prompt excluded)."""
    if batch_size < 1:
        raise ActSteerError(f"batch_size must be at least 1, got {batch_size}")
    strengths = list(strengths)
    sampling = Sampling.coerce(sampling)
    per_call = max(1, batch_size // len(strengths))
    chunks = [prompts[i : i + per_call] for i in range(0, len(prompts), per_call)]
    extra: dict[str, Any] = {} if sampling.do_sample else {"temperature": None, "top_p": None}
    device = model_device(model)
    devices = [device] if device.type == "cuda" else []
    texts: list[list[str]] = []
    with tqdm(total=len(prompts) * len(strengths), desc=desc, disable=not progress) as bar:
        for number, chunk in enumerate(chunks):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed * 1_000_003 + number)
                texts += generate_grid(
                    model,
                    tokenizer,
                    list(chunk),
                    strengths,
                    steering,
                    support,
                    **{**sampling.as_dict(), **extra},
                )
            bar.update(len(chunk) * len(strengths))
    return texts
