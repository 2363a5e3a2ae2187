"""A row's tokens independent of its batch-mates: attention over each row's own keys, and batch
sizes rounded to the matrix kernel's row block.

Two things make a row of a batched float32 forward pass differ from the same row run alone.
Attention over left padding: the masked keys shift where the real ones fall in the kernel's
blocked sums. And the matrix multiply: its result for one row depends on how many rows the call
has (measured with MKL on x86: calls of 1–3, 5–7 and 9–11 rows take other code paths than
multiples of 4, whose rows all agree with each other and with any larger call). So attention
runs row by row on each row's real keys, in the shapes it has alone, and every decode batch is
filled up to a multiple of the row quantum that `row_quantum` measures on the model's device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from actsteer.errors import ActSteerError

#: The name the per-row attention is registered under in transformers' AttentionInterface.
ROW_ATTENTION = "actsteer_rows"
#: Row counts tried by `row_quantum`, smallest first.
QUANTA = (1, 2, 4, 8, 16, 32)


def row_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    actsteer_pads: list[int] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention of each row over its own keys, the first `actsteer_pads[i]` cached
    positions of row i being left padding: the prompt pass of one unpadded row, or a decode
    step of one query per row."""
    rows, _, queries, _ = query.shape
    pads = actsteer_pads or [0] * rows
    if queries > 1 and (rows > 1 or pads[0] or key.shape[2] != queries):
        raise ActSteerError("per-row attention takes a prompt pass of one row without a cache")
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                query[i : i + 1],
                key[i : i + 1, :, pad:],
                value[i : i + 1, :, pad:],
                scale=scaling,
                is_causal=queries > 1,
                enable_gqa=grouped,
            )
            for i, pad in enumerate(pads)
        ]
    )
    return out.transpose(1, 2).contiguous(), None


def use_row_attention(model: nn.Module) -> str:
    """Switch `model` to the per-row attention; returns the implementation it had before."""
    from transformers import AttentionInterface

    if softcapped(model):
        raise ActSteerError(
            "this model caps its attention logits (attn_logit_softcapping), which the server's "
            "per-row attention does not do; serve a model without it"
        )
    AttentionInterface.register(ROW_ATTENTION, row_attention)
    config: Any = model.config
    before = str(config._attn_implementation)
    model.set_attn_implementation(ROW_ATTENTION)  # type: ignore[operator]
    return before


def softcapped(model: nn.Module) -> bool:
    """Whether the model caps attention logits (Gemma 2), which `row_attention` does not do."""
    config: Any = getattr(model, "config", None)
    text = getattr(config, "text_config", config)
    return getattr(text, "attn_logit_softcapping", None) is not None


def row_quantum(width: int, device: torch.device, dtype: torch.dtype) -> int:
    """The fewest rows q such that a linear layer computes every row the same in any call of a
    multiple of q rows (compared with one call of 256 rows); 32 if none smaller does."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(width, width, generator=generator).to(device, dtype)
    x = torch.randn(256, width, generator=generator).to(device, dtype)
    reference = F.linear(x, weight)
    for quantum in QUANTA[:-1]:
        sizes = range(quantum, 65, quantum)
        if all(torch.equal(F.linear(x[:m], weight), reference[:m]) for m in sizes):
            return quantum
    return QUANTA[-1]
