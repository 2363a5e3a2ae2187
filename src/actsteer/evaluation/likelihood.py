"""Teacher-forced log-likelihoods of texts under a (possibly steered) causal LM, batched.

Texts are tokenised in parts (shared prefix, context, continuation) and the parts' ids are
concatenated, as lm-evaluation-harness does. A prefix shared by every request (a few-shot
preamble) runs once; its KV cache is copied for each batch, so a long preamble costs one pass
(except under a prompt gate, which decides from the whole prompt: there each row carries the
prefix).
Batches are right-padded: real tokens never attend to padding under the causal mask.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from actsteer.errors import ActSteerError
from actsteer.models import cache_keyword
from actsteer.sources import holds_prompt_decisions
from actsteer.tree import model_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids a tokenizer puts before any text by default (e.g. BOS); often empty."""
    with_special = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a piece of text, without special tokens."""
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ActSteerError("the tokenizer has neither a pad nor an eos token to pad with")
    return int(pad)


def batched_logits(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prefix: Sequence[int],
    rows: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Forward every row (appended to the shared `prefix` ids), a batch at a time.

    Yields (row indices, logits, prefix_logits): logits[b, j] (float32) predicts token j + 1 of
    row b; prefix_logits[b] predicts its token 0 (None without a prefix). Rows are grouped by
    length to limit padding; run it inside the steering context you want.
    """
    if batch_size < 1:
        raise ActSteerError(f"batch_size must be at least 1, got {batch_size}")
    device = model_device(model)
    pad = _pad_id(tokenizer)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    keyword = cache_keyword(model)
    n_prefix = len(prefix)
    lead = list(prefix) if prefix and holds_prompt_decisions(model) else []  # in every row
    with torch.inference_mode():
        cache, prefix_logits = None, None
        if prefix and not lead:
            out = model(torch.tensor([list(prefix)], device=device), use_cache=True)
            cache, prefix_logits = getattr(out, keyword), out.logits[0, -1].float()
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            width = len(lead) + max(len(rows[i]) for i in batch)
            if width == len(lead):
                raise ActSteerError("cannot score an empty text")
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), n_prefix + width - len(lead)), dtype=torch.long)
            mask[:, :n_prefix] = 1
            for b, i in enumerate(batch):
                ids[b, : len(lead) + len(rows[i])] = torch.tensor(lead + list(rows[i]))
                mask[b, n_prefix : n_prefix + len(rows[i])] = 1
            kwargs = {}
            if cache is not None:
                batch_cache = copy.deepcopy(cache)
                batch_cache.batch_repeat_interleave(len(batch))
                kwargs[keyword] = batch_cache
            first = n_prefix - len(lead)
            positions = torch.arange(first, first + width).expand(len(batch), width)
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=cache is not None,
                **kwargs,
            ).logits.float()
            if lead:
                yield batch, logits[:, n_prefix:], logits[:, n_prefix - 1]
            else:
                shared = None if prefix_logits is None else prefix_logits.expand(len(batch), -1)
                yield batch, logits, shared


def continuation_logprobs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    *,
    shared_prefix: str = "",
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
) -> list[tuple[float, int]]:
    """Summed log-probability and token count of each continuation given its context.

    requests: (context, continuation) pairs; the model reads special prefix (BOS) + shared_prefix
    + context + continuation, and only the continuation's tokens are scored.
    """
    prefix = special_prefix(tokenizer) + encode(tokenizer, shared_prefix)
    contexts = [encode(tokenizer, ctx) for ctx, _ in requests]
    continuations = [encode(tokenizer, cont) for _, cont in requests]
    for i, cont in enumerate(continuations):
        if not cont:
            raise ActSteerError(f"request {i} has an empty continuation: nothing to score")
        if not prefix and not contexts[i]:
            raise ActSteerError(
                f"request {i} has no context and the tokenizer adds no BOS token, so the first "
                "continuation token has nothing to be predicted from"
            )
    rows = [ctx + cont for ctx, cont in zip(contexts, continuations, strict=True)]
    results: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for batch, logits, prefix_logits in batched_logits(
        model, tokenizer, prefix, rows, batch_size=batch_size, progress=progress, desc=desc
    ):
        for b, i in enumerate(batch):
            start, end = len(contexts[i]), len(rows[i])
            preds = logits[b, max(start - 1, 0) : end - 1]
            if start == 0:  # the first continuation token is predicted by the prefix
                assert prefix_logits is not None  # checked above: no context, no BOS is refused
                preds = torch.cat([prefix_logits[b : b + 1], preds])
            targets = torch.tensor(rows[i][start:end], device=preds.device)
            logprobs = preds.log_softmax(-1).gather(-1, targets[:, None])
            results[i] = (float(logprobs.sum()), end - start)
    return results


def next_token_logprobs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[str],
    candidates: Sequence[int],
    *,
    shared_prefix: str = "",
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
) -> np.ndarray:
    """(N, K) log-probabilities of the candidate token ids right after each context."""
    prefix = special_prefix(tokenizer) + encode(tokenizer, shared_prefix)
    rows = [encode(tokenizer, ctx) for ctx in contexts]
    if any(not row for row in rows):
        raise ActSteerError("every context needs at least one token")
    out = np.zeros((len(rows), len(candidates)))
    index = torch.tensor(list(candidates))
    for batch, logits, _ in batched_logits(
        model, tokenizer, prefix, rows, batch_size=batch_size, progress=progress, desc=desc
    ):
        for b, i in enumerate(batch):
            last = logits[b, len(rows[i]) - 1].log_softmax(-1)
            out[i] = last[index.to(last.device)].cpu().numpy()
    return out


def continuation_perplexity(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[tuple[str, str]]
) -> float:
    """Perplexity of the continuations given their contexts, pooled over their tokens:
    exp(−Σ log-probability / Σ tokens) of `continuation_logprobs`."""
    scored = continuation_logprobs(model, tokenizer, requests)
    return math.exp(-sum(lp for lp, _ in scored) / max(sum(n for _, n in scored), 1))
