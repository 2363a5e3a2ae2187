"""Teacher-forced perplexity of a (steered) model on WikiText-2 raw test text.

The text is built the way the Hugging Face recipe does (`"\\n\\n".join(rows)` over the
dataset's rows: each non-blank line with its newline, each blank line as ""), tokenised once,
and cut to a fixed token budget (the first `max_tokens` tokens: a fixed, documented slice).
Windows of `window` tokens advance by `stride`: stride == window gives blocked windows, a
smaller stride a sliding window in which each token is scored once, with up to
window − stride tokens of extra context. The tokenizer's BOS (if it adds one) starts every
window and is never scored. Perplexity = exp(mean negative log-likelihood per scored token).

Text (see `actsteer.evaluation.data`): `data` (a raw text file, or a hub dataset with a `text`
column); else wikitext/wiki.test.raw under $ACTSTEER_DATA; else the hub's Salesforce/wikitext
(wikitext-2-raw-v1, test split), whose rows are the raw file's lines (blank ones as ""), so
both give the same text. The source actually read is each result's `settings["data"]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from actsteer.choices import PERPLEXITY_TOKENS, PERPLEXITY_WINDOW
from actsteer.errors import ActSteerError
from actsteer.evaluation.common import describe_steering, resolve_strengths, steering_applied
from actsteer.evaluation.data import load_hub, require_keys, resolve_data
from actsteer.evaluation.likelihood import special_prefix
from actsteer.evaluation.tasks.registry import Task, register
from actsteer.steering import Steering
from actsteer.tree import model_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WIKITEXT_FILE = "wikitext/wiki.test.raw"
WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
#: Defaults: the first 4096 tokens of WikiText-2 test, in blocked windows of 512.
MAX_TOKENS = PERPLEXITY_TOKENS
WINDOW = PERPLEXITY_WINDOW


@dataclass
class PerplexityResult:
    """Perplexity at one strength, with the token count and windowing that produced it."""

    TASK: ClassVar[str] = "perplexity"
    # No data named here: the text read is settings["data"] (WikiText-2 test by default).
    METRICS: ClassVar[dict[str, str]] = {"perplexity": "perplexity"}

    strength: float
    perplexity: float
    nll_per_token: float
    n_tokens: int
    settings: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {"perplexity": self.perplexity}

    def intervals(self) -> dict[str, tuple[float, float]]:
        return {}


def data_source(data: str | Path | None = None) -> Path | str:
    """The text's source: `data`, else WIKITEXT_FILE under $ACTSTEER_DATA, else WIKITEXT_HUB."""
    return resolve_data(data, WIKITEXT_FILE, WIKITEXT_HUB, "WikiText")


def load_wikitext(data: str | Path | None = None) -> str:
    """The WikiText test text joined HF-style; data is a raw file, or "hf:ID[:CONFIG[:SPLIT]]"."""
    source = data_source(data)
    if isinstance(source, str):
        rows: list[Any] = load_hub(source)  # records, then their texts
        for number, row in enumerate(rows):
            require_keys(row, ("text",), f"{source} row {number}")
        rows = [row["text"] for row in rows]
    else:
        lines = source.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the file's final newline ends the last line; it is not a blank line
        rows = [line + "\n" if line.strip() else "" for line in lines]
    text = "\n\n".join(rows)
    if not text.strip():
        raise ActSteerError(f"the perplexity text ({source}) is empty")
    return text


def tokens_for_budget(
    tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int | None
) -> list[int]:
    """The first max_tokens token ids of the text (all of them when max_tokens is None)."""
    if max_tokens is not None and max_tokens < 2:
        raise ActSteerError(f"max_tokens must be at least 2, got {max_tokens}")
    chars = len(text) if max_tokens is None else max_tokens * 8
    while True:  # tokenise a prefix generous enough for the budget, not the whole corpus
        ids = list(tokenizer(text[:chars], add_special_tokens=False).input_ids)
        if max_tokens is None or len(ids) > max_tokens or chars >= len(text):
            return ids if max_tokens is None else ids[:max_tokens]
        chars *= 2


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) per window: tokens [end − n_scored, end) are scored in it."""
    if window < 2 or not 1 <= stride <= window:
        raise ActSteerError(f"need window ≥ 2 and 1 ≤ stride ≤ window, got {window}, {stride}")
    out, scored_until = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        if end > scored_until:
            out.append((begin, end, end - scored_until))
            scored_until = end
        if end == n_tokens:
            break
    return out


def token_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ids: Sequence[int],
    *,
    window: int = WINDOW,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> tuple[float, int]:
    """Summed negative log-likelihood and number of scored tokens over windows of `ids`."""
    stride = stride or window
    prefix = special_prefix(tokenizer)
    spans = windows(len(ids), window, stride)
    device = model_device(model)
    total, count = 0.0, 0
    # Windows of equal length batch together (all but possibly the last one).
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    batches = [
        group[i : i + batch_size]
        for group in groups.values()
        for i in range(0, len(group), batch_size)
    ]
    with torch.inference_mode():
        for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
            rows = torch.tensor([prefix + list(ids[b:e]) for b, e, _ in batch], device=device)
            logprobs = model(input_ids=rows).logits[:, :-1].float().log_softmax(-1)
            targets = logprobs.gather(-1, rows[:, 1:, None])[..., 0]
            for r, (_, _, n_scored) in enumerate(batch):
                # target column t scores row position t + 1, so the last n_scored columns are
                # the window's scored tokens; without a prefix its first token is never scored.
                n = min(n_scored, targets.shape[1])
                total -= float(targets[r, -n:].sum())
                count += n
    return total, count


def evaluate_grid(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    steering: Steering | None = None,
    strengths: Sequence[float] | float | None = None,
    *,
    data: str | Path | None = None,
    max_tokens: int | None = MAX_TOKENS,
    window: int = WINDOW,
    stride: int | None = None,
    batch_size: int = 4,
    support: str | None = None,
    progress: bool = True,
) -> list[PerplexityResult]:
    """Perplexity of the model steered at each strength (the plain model without a steering)."""
    strengths = resolve_strengths(steering, strengths)
    source = data_source(data)
    ids = tokens_for_budget(tokenizer, load_wikitext(source), max_tokens)
    settings = {
        "data": str(source),
        "max_tokens": max_tokens,
        "window": window,
        "stride": stride or window,
        "support": support,
        "steering": describe_steering(steering),
    }
    results = []
    for strength in tqdm(
        strengths, desc="perplexity λ", disable=not progress or len(strengths) < 2
    ):
        with steering_applied(model, steering, strength, support):
            total, count = token_nll(
                model,
                tokenizer,
                ids,
                window=window,
                stride=stride,
                batch_size=batch_size,
                progress=progress,
            )
        nll = total / count
        results.append(PerplexityResult(strength, math.exp(nll), nll, count, dict(settings)))
    return results


PERPLEXITY = register(
    Task(
        name="perplexity",
        evaluate_grid=evaluate_grid,
        result_type=PerplexityResult,
        generation=False,
        description="teacher-forced perplexity on held-out text (WikiText-2 test by default)",
    )
)
