"""Generating a grid of prompts × strengths in one batched `generate` call.

Row p·S + s of the batch is prompt p steered with strength s: one per-row strength tensor carries
the whole sweep, so a λ sweep costs one generation instead of one per strength.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, cast

import torch
from tqdm.auto import tqdm

from actsteer.chat import chat_texts
from actsteer.errors import ActSteerError
from actsteer.steering import Steering, steered
from actsteer.strengths import resolve_strengths
from actsteer.tree import model_device

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase


@contextmanager
def left_padding(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Left padding (and a pad token) for batched generation; the tokenizer is restored after."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        if tokenizer.eos_token is None:
            raise ActSteerError("the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = pad


class _TokenProgress:
    """A stopping criterion that never stops: it advances a progress bar once per decoding step."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def grid_strengths(n_prompts: int, strengths: Sequence[float]) -> torch.Tensor:
    """The (n_prompts · S,) per-row strength tensor: row p·S + s has strength strengths[s]."""
    return torch.tensor([float(s) for s in strengths], dtype=torch.float32).repeat(n_prompts)


def generate_grid(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    strengths: Sequence[float] | None = None,
    steering: Steering | None = None,
    support: str | None = None,
    positions: str = "all",
    fixed: Sequence[tuple[Steering, float]] = (),
    chat: bool = False,
    progress: bool = False,
    **generate_kwargs: Any,
) -> list[list[str]]:
    """Continuations of every prompt at every strength, from one batched `model.generate` call.

    Returns `texts[p][s]`: the newly generated text (prompt excluded, special tokens skipped) of
    prompts[p] steered with strengths[s]. Without a steering the model generates untouched and
    each prompt gets one column (strengths must then be omitted or all 0). strengths defaults to
    the steering's default strength. `fixed` steerings, each with its own strength, apply on
    every row before the swept one (composition, in the given order); `positions` chooses the
    token positions every steering acts on. chat: each prompt goes in as a user turn of the
    tokenizer's chat template (actsteer.chat). progress: a bar on stderr counting decoding steps
    (new tokens per row). generate_kwargs go to `model.generate` (max_new_tokens defaults to 40,
    do_sample to False).
    """
    if isinstance(prompts, str):
        raise ActSteerError("prompts must be a list of texts, not one string")
    prompts = list(prompts)
    if not prompts or any(not isinstance(p, str) or not p for p in prompts):
        raise ActSteerError("give at least one prompt, and no empty prompt")
    strengths = resolve_strengths(steering, strengths)

    for key in ("num_beams", "num_return_sequences"):
        if generate_kwargs.get(key, 1) != 1:
            raise ActSteerError(
                f"{key}={generate_kwargs[key]} is not supported: every batch row carries its own "
                "strength, so generate must return one sequence per row"
            )
    inputs = chat_texts(tokenizer, prompts) if chat else prompts
    rows = [p for p in inputs for _ in strengths]
    generate_kwargs.setdefault("max_new_tokens", 40)
    generate_kwargs.setdefault("do_sample", False)
    device = model_device(model)
    with left_padding(tokenizer):
        encoded = tokenizer(rows, return_tensors="pt", padding=True).to(device)
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        lam = grid_strengths(len(prompts), strengths)
        swept = (
            nullcontext()
            if steering is None
            else steering.applied(model, lam, support, positions=positions)
        )
        bar = tqdm(
            total=generate_kwargs["max_new_tokens"],
            desc=f"generating {len(rows)} row(s)",
            unit="tok",
            disable=not progress,
            leave=False,
        )
        if progress:
            from transformers import StoppingCriteriaList

            criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
            criteria.append(_TokenProgress(bar))
            generate_kwargs["stopping_criteria"] = criteria
        with bar, steered(model, *fixed, positions=positions), swept, torch.inference_mode():
            output = cast("GenerationMixin", model).generate(  # a causal LM's generate
                input_ids=encoded["input_ids"],
                attention_mask=encoded["attention_mask"],
                **generate_kwargs,
            )
    new_tokens = output[:, encoded["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    n = len(strengths)
    return [texts[p * n : (p + 1) * n] for p in range(len(prompts))]
