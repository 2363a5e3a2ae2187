"""Mean-AcT: shift every unit by the difference of target and source means."""

from __future__ import annotations

from typing import TYPE_CHECKING

from actsteer.methods.registry import Method, register

if TYPE_CHECKING:
    import torch


def fit_mean(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ω = 1, β = m_t − m_s (in float64)."""
    import torch

    beta = target.double().mean(0) - source.double().mean(0)
    return torch.ones_like(beta).float(), beta.float()


MEAN_ACT = register(
    Method(
        name="mean-act",
        description="per-unit shift by the mean difference (ω = 1)",
        fit_omega_beta=fit_mean,
    )
)
