"""Which modules to steer, and recording their activations pooled into one sample per text.

Modules are chosen by a named preset (per architecture family: `actsteer.families`), a regular
expression (full match over `model.named_modules()`) or an explicit list of names. Recording
runs batched forward passes with hooks; padding never reaches the statistics.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from actsteer.choices import POOLINGS, check_choice
from actsteer.errors import ActSteerError
from actsteer.families import PRESET_NAMES, find_family, model_type
from actsteer.tree import model_device, output_tensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _summarise_names(names: Sequence[str], limit: int = 12) -> str:
    """Module names with layer indices collapsed ("model.layers.*.mlp"), for error messages."""
    shapes = list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in names if n))
    more = f" … ({len(shapes) - limit} more)" if len(shapes) > limit else ""
    return ", ".join(shapes[:limit]) + more


def resolve_modules(model: nn.Module, spec: str | Sequence[str]) -> list[str]:
    """Module names selected by a preset name, a regex (full match) or a list of names.

    Names come back in the model's module order. A selection that matches nothing is an error
    that shows the module names that exist.
    """
    names = [name for name, _ in model.named_modules()]
    if isinstance(spec, str) and spec in PRESET_NAMES:
        family = find_family(model)
        if family is None:
            raise ActSteerError(
                f"preset {spec!r} is not defined for model type {model_type(model)!r} (it is "
                "not in actsteer/families.py); pass a regular expression over module names "
                f"instead, e.g. one of: {_summarise_names(names)}"
            )
        if spec not in family.presets:
            raise ActSteerError(
                f"preset {spec!r} does not apply to this model; its presets are: "
                f"{', '.join(family.presets)}"
            )
        spec = family.presets[spec]
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ActSteerError(f"module pattern {spec!r} is not a valid regex: {err}") from None
        chosen = [n for n in names if n and pattern.fullmatch(n)]
        if not chosen:
            raise ActSteerError(
                f"module pattern {spec!r} matches no module of this model; "
                f"module names look like: {_summarise_names(names)}"
            )
        return chosen
    wanted = list(spec)
    if not wanted:
        raise ActSteerError(
            "modules names no module (an empty list); give a preset, a regex or module names, "
            "or leave it out for the default"
        )
    missing = [n for n in wanted if n not in set(names)]
    if missing:
        raise ActSteerError(
            f"module {missing[0]!r} does not exist in this model; "
            f"module names look like: {_summarise_names(names)}"
        )
    order = {n: i for i, n in enumerate(names)}
    return sorted(wanted, key=order.__getitem__)


def pool(activations: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool (B, T, D) token activations over real tokens (mask (B, T) bool) into samples.

    mean/last/max give (B, D); all gives (number of real tokens, D).
    """
    if activations.ndim != 3 or activations.shape[:2] != mask.shape:
        raise ActSteerError(
            f"expected (batch, tokens, units) activations matching the batch {tuple(mask.shape)}, "
            f"got shape {tuple(activations.shape)}; choose modules whose output is per token"
        )
    check_choice(pooling, POOLINGS, "pooling")
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(activations.dtype)
        return (activations * weights).sum(1) / weights.sum(1).clamp(min=1)
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask * positions).argmax(dim=1)
        return activations[torch.arange(mask.shape[0], device=mask.device), last]
    if pooling == "max":
        return activations.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
    return activations[mask]  # "all"


class SampleBuffer:
    """Collects pooled samples of one module; with a cap, keeps a uniform random subset.

    The capped subset is a reservoir (Algorithm R, vectorised per batch) in one preallocated
    (cap, D) tensor: rows are written in place, so memory is cap rows however many tokens pass
    through, and each batch costs time in proportion to its own size.
    """

    def __init__(self, cap: int | None, seed: int = 0) -> None:
        self.cap = cap
        self.rows: list[torch.Tensor] = []
        self.reservoir: torch.Tensor | None = None
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float().cpu()
        if self.cap is None:
            self.rows.append(rows)
            return
        if self.reservoir is None:
            self.reservoir = torch.empty(self.cap, rows.shape[1])
        n, filled = rows.shape[0], min(self.seen, self.cap)
        fill = min(n, self.cap - filled)
        self.reservoir[filled : filled + fill] = rows[:fill]
        if fill < n:  # row number t (0-based) replaces a random slot with probability cap/(t+1)
            t = torch.arange(self.seen + fill, self.seen + n, dtype=torch.float64)
            slot = torch.rand(n - fill, generator=self.generator, dtype=torch.float64) * (t + 1)
            keep = slot < self.cap
            self.reservoir[slot[keep].long()] = rows[fill:][keep]
        self.seen += n

    def samples(self) -> torch.Tensor:
        if self.reservoir is not None:
            return self.reservoir[: min(self.seen, cast(int, self.cap))]  # set with the reservoir
        return torch.cat(self.rows) if self.rows else torch.empty(0, 0)


class HookedBuffers:
    """Forward hooks on named modules, each feeding a SampleBuffer; subclasses say how."""

    def __init__(self, model: nn.Module, modules: Sequence[str], cap: int | None, seed: int = 0):
        self.buffers = {name: SampleBuffer(cap, seed) for name in modules}
        lookup = dict(model.named_modules())
        self.handles = [
            lookup[name].register_forward_hook(self._hook(name)) for name in self.buffers
        ]

    def _hook(self, name: str):
        raise NotImplementedError

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def samples(self) -> dict[str, torch.Tensor]:
        return {name: buffer.samples() for name, buffer in self.buffers.items()}


class Recorder(HookedBuffers):
    """Pools the outputs of named modules over each text's real tokens.

    Set `mask` to the current batch's attention mask before each forward pass.
    """

    def __init__(
        self, model: nn.Module, modules: Sequence[str], pooling: str, cap: int | None, seed: int = 0
    ) -> None:
        check_choice(pooling, POOLINGS, "pooling")
        self.pooling = pooling
        self.mask: torch.Tensor | None = None
        super().__init__(model, modules, cap, seed)

    def _hook(self, name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            assert self.mask is not None, "Recorder.mask must be set before a forward pass"
            self.buffers[name].add(pool(output_tensor(output), self.mask, self.pooling))

        return hook


def check_texts(texts: Sequence[str], what: str, minimum: int = 2) -> list[str]:
    """Texts as a list of at least `minimum` non-empty strings, or a clear error."""
    if isinstance(texts, str):
        raise ActSteerError(f"{what} must be a list of texts, not one string")
    texts = [t for t in texts if t and t.strip()]
    if len(texts) < minimum:
        raise ActSteerError(
            f"{what} has {len(texts)} non-empty text(s); at least {minimum} are needed to "
            "estimate a distribution (a few dozen or more give stable maps)"
        )
    return texts


def warn_truncated(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, what: str
) -> None:
    """Warn, with a count, when texts are longer than `max_length` tokens (they are cut)."""
    lengths = [len(ids) for ids in tokenizer(list(texts), verbose=False)["input_ids"]]
    cut = [n for n in lengths if n > max_length]
    if cut:
        warnings.warn(
            f"actsteer: {len(cut)} of {len(texts)} {what} texts are longer than max_length = "
            f"{max_length} tokens (the longest {max(cut)}) and are cut to it; raise max_length "
            "(CLI: --max-length) to keep them whole",
            stacklevel=3,
        )


@contextmanager
def _right_padding(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Right padding for recording: real tokens keep positions 0..n-1 without position ids."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    device: torch.device,
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised, right-padded batches on the model's device."""
    with _right_padding(tokenizer):
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(
                list(texts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            yield {
                k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")
            }


def forward_body(model: nn.Module, modules: Sequence[str]) -> nn.Module:
    """The smallest part of the model to run: the base model (no LM head) when it holds them all."""
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if isinstance(body, nn.Module) and all(n.startswith(prefix + ".") for n in modules):
        return body
    return model


def sample_cap(pooling: str, n_modules: int, width: int, budget_mb: float) -> int | None:
    """Per-module sample cap for `all` pooling so all buffers fit in budget_mb of float32."""
    if pooling != "all":
        return None
    return max(1000, int(budget_mb * 2**20 / (4 * max(1, n_modules) * max(1, width))))


def record(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    modules: Sequence[str],
    *,
    pooling: str = "mean",
    batch_size: int = 16,
    max_length: int = 128,
    budget_mb: float = 1024,
    progress: bool = True,
    desc: str = "recording",
) -> dict[str, torch.Tensor]:
    """Pooled activations {module: (samples, units)} of `texts` at the named modules.

    With pooling "all" every real token is a sample, subsampled uniformly so all modules together
    hold at most about `budget_mb` of float32.
    """
    texts = check_texts(texts, desc, minimum=1)
    width = getattr(getattr(model, "config", None), "hidden_size", 1024)
    recorder = Recorder(
        model, modules, pooling, sample_cap(pooling, len(modules), width, budget_mb)
    )
    body = forward_body(model, modules)
    total = -(-len(texts) // batch_size)
    try:
        with torch.inference_mode():
            encoded = batches(tokenizer, texts, batch_size, max_length, model_device(model))
            for batch in tqdm(encoded, total=total, desc=desc, disable=not progress, leave=False):
                recorder.mask = batch["attention_mask"].bool()
                body(**batch, use_cache=False)
    finally:
        recorder.remove()
    return recorder.samples()
