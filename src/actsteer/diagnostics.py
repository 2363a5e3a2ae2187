"""Which layers matter: per steered module, how well source and target separate, and how much
of the data the map's support covers.

- separation: per unit, the AUROC of its pooled activation as a detector of source vs target
  texts (Mann–Whitney U; 0.5 is chance); summarised per module as the mean over units of
  |2·AUROC − 1| (0: indistinguishable, 1: every unit separates perfectly) and its largest unit.
- support coverage: the fraction of token activations (every real token, every unit) of the
  given texts that lie inside the module's support. Supports are estimated on pooled samples
  (one per text) but applied per token, so even on the fitting texts much of the token
  activations can fall outside a q0-100 support.

Activations are recorded on the plain model (no steering applied).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from actsteer.capture import record
from actsteer.steering import Steering
from actsteer.transport import inside

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class ModuleReport:
    """What one steered module looks like on data (separation None without target texts)."""

    module: str
    inside: float
    separation: float | None = None
    strongest: float | None = None


def unit_auroc(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """(D,) AUROC of every unit as a detector of `positive` (N, D) against `negative` (M, D):
    P(x > y) + P(x = y) / 2 over pairs, per unit."""
    ordered = negative.double().T.contiguous().sort(dim=1).values  # (D, M)
    values = positive.double().T.contiguous()  # (D, N)
    below = torch.searchsorted(ordered, values, side="left").double()
    ties = torch.searchsorted(ordered, values, side="right").double() - below
    return (below + ties / 2).mean(1) / negative.shape[0]


def module_reports(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    steering: Steering,
    source: Sequence[str],
    target: Sequence[str] | None = None,
    *,
    support: str | None = None,
    max_length: int = 128,
    batch_size: int = 16,
    progress: bool = False,
) -> list[ModuleReport]:
    """One report per steered module, in the steering's order (see the module docstring)."""
    support = support or steering.default_support
    names = steering.modules
    options: dict[str, Any] = {"max_length": max_length, "batch_size": batch_size}
    options["progress"] = progress
    tokens = record(model, tokenizer, source, names, pooling="all", **options)
    reports = []
    for name in names:
        bounds = steering.maps[name].support(support)
        a = tokens[name].float()
        share = 1.0 if bounds is None else float(inside(a, *bounds).mean(dtype=torch.float32))
        reports.append(ModuleReport(name, share))
    if target is not None:
        pooling = steering.info.pooling or "mean"
        pooled = {
            what: record(model, tokenizer, texts, names, pooling=pooling, **options)
            for what, texts in (("source", source), ("target", target))
        }
        for report in reports:
            auroc = unit_auroc(pooled["source"][report.module], pooled["target"][report.module])
            strength = (2 * auroc - 1).abs()
            report.separation, report.strongest = float(strength.mean()), float(strength.max())
    return reports
