"""AurA (Suau et al., 2024): dampen each unit in proportion to how well it detects the source.

Per unit, AUROC of its activation as a detector of source (positive) vs target samples
(max-pooled by default); ω = 1 − 2(AUROC − 0.5) where AUROC > 0.5, else 1; β = 0. λ ∈ [0, 1].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actsteer.extras import require
from actsteer.methods.registry import Method, register

if TYPE_CHECKING:
    import torch


def unit_auroc(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """AUROC of every unit as a detector of `positive` samples (Mann–Whitney U, ties averaged)."""
    import torch

    n_pos, n_neg = positive.shape[0], negative.shape[0]
    values = torch.cat([positive, negative]).double().numpy()
    stats = require("scipy.stats", "eval", "AurA (per-unit AUROC)")
    ranks = torch.from_numpy(stats.rankdata(values, axis=0))
    u = ranks[:n_pos].sum(0) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def fit_aura(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    auroc = unit_auroc(source, target)
    omega = torch.where(auroc > 0.5, 1 - 2 * (auroc - 0.5), torch.ones_like(auroc))
    return omega.float(), torch.zeros_like(omega).float()


AURA = register(
    Method(
        name="aura",
        description="dampen units by their AUROC as source detectors: ω = 1 − 2(AUROC − 0.5)",
        fit_omega_beta=fit_aura,
        default_support="all",
        default_pooling="max",
    )
)
