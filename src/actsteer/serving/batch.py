"""The rows being decoded together: one left-padded KV cache, each row's length, one forward
step for all of them.

A row joins after its prompt pass, run alone (so it is computed exactly as when served alone);
its cache is then left-padded to the batch's width. Rows are filled up to a multiple of the row
quantum with copies of the first row, whose outputs are thrown away (see `invariance`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from actsteer.models import cache_keyword
from actsteer.tree import model_device

#: One row's cache: per layer, its (keys, values) of shape (1, heads, tokens, head_dim).
RowCache = list[tuple[torch.Tensor, torch.Tensor]]


def _layers(cache: DynamicCache) -> RowCache:
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]


def _cache(layers: RowCache) -> DynamicCache:
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


class DecodeBatch:
    """Rows in decode: their caches (left-padded to one width) and lengths (real tokens)."""

    def __init__(self, model: nn.Module, quantum: int) -> None:
        self.model = model
        self.quantum = quantum
        self.device = model_device(model)
        self.cache_key = cache_keyword(model)  # `cache`; `past_key_values` before 5.x
        self.rows: list[RowCache] = []  # each row's own (unpadded) cache
        self.lengths: list[int] = []
        self.cache: DynamicCache | None = None  # the padded batch, rebuilt when rows change

    def __len__(self) -> int:
        return len(self.lengths)

    def prompt_pass(self, ids: list[int], **forward: Any) -> tuple[torch.Tensor, RowCache]:
        """The next-token logits (V,) of one prompt run alone, and its cache."""
        input_ids = torch.tensor([ids], device=self.device)
        positions = torch.arange(len(ids), device=self.device)[None]
        cache = DynamicCache()
        output = self.model(
            input_ids=input_ids,
            position_ids=positions,
            **{self.cache_key: cache},
            use_cache=True,
            logits_to_keep=1,
            actsteer_pads=[0],
            **forward,
        )
        return output.logits[0, -1].float(), _layers(cache)

    def add(self, row: RowCache, length: int) -> None:
        self._sync()
        self.rows.append(row)
        self.lengths.append(length)
        self.cache = None

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order)."""
        self._sync()
        self.rows = [self.rows[i] for i in indices]
        self.lengths = [self.lengths[i] for i in indices]
        self.cache = None

    @property
    def slots(self) -> int:
        """Rows in a forward pass: the real ones filled up to a multiple of the quantum."""
        return -(-len(self) // self.quantum) * self.quantum

    def step(self, tokens: list[int], **forward: Any) -> torch.Tensor:
        """Feed each row its next token; the next-token logits (rows, V) of the real rows."""
        fill = self.slots - len(self)
        if self.cache is None:
            self.cache = self._assemble(fill)
        width = max(self.lengths)
        pads = [width - n for n in self.lengths] + [width - self.lengths[0]] * fill
        input_ids = torch.tensor([tokens + tokens[:1] * fill], device=self.device).T
        positions = torch.tensor([self.lengths + self.lengths[:1] * fill], device=self.device).T
        output = self.model(
            input_ids=input_ids,
            position_ids=positions,
            **{self.cache_key: self.cache},
            use_cache=True,
            logits_to_keep=1,
            actsteer_pads=pads,
            **forward,
        )
        self.lengths = [n + 1 for n in self.lengths]
        return output.logits[: len(self), -1].float()

    def _assemble(self, fill: int) -> DynamicCache:
        """The batch cache: every row left-padded to the longest, plus `fill` copies of row 0."""
        width = max(self.lengths)
        rows = self.rows + self.rows[:1] * fill
        lengths = self.lengths + self.lengths[:1] * fill

        def padded(i: int, layer: int, part: int) -> torch.Tensor:
            return F.pad(rows[i][layer][part], (0, 0, width - lengths[i], 0))

        return _cache(
            [
                (
                    torch.cat([padded(i, layer, 0) for i in range(len(rows))]),
                    torch.cat([padded(i, layer, 1) for i in range(len(rows))]),
                )
                for layer in range(len(self.rows[0]))
            ]
        )

    def _sync(self) -> None:
        """Take each row's own cache back out of the batch cache (which grew with the steps)."""
        if self.cache is None:
            return
        width = max(self.lengths)
        layers = _layers(self.cache)
        self.rows = [
            [(k[i : i + 1, :, width - n :], v[i : i + 1, :, width - n :]) for k, v in layers]
            for i, n in enumerate(self.lengths)
        ]
