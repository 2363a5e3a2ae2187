"""Gaussian-AcT: the optimal transport map between per-unit Gaussians fitted to each set."""

from __future__ import annotations

from typing import TYPE_CHECKING

from actsteer.methods.registry import Method, register

if TYPE_CHECKING:
    import torch


def fit_gaussian(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ω = σ_t/σ_s, β = m_t − ω m_s (in float64); units with σ_s ≈ 0 keep ω = 1, β = 0."""
    import torch

    s, t = source.double(), target.double()
    ms, mt = s.mean(0), t.mean(0)
    ss, st = s.std(0, correction=0), t.std(0, correction=0)
    flat = ss <= 1e-6 * (1 + ms.abs())
    omega = torch.where(flat, 1.0, st / torch.where(flat, 1.0, ss))
    beta = torch.where(flat, 0.0, mt - omega * ms)
    return omega.float(), beta.float()


GAUSSIAN_ACT = register(
    Method(
        name="gaussian-act",
        description="per-unit Gaussian transport: ω = σ_t/σ_s, β = m_t − ω m_s",
        fit_omega_beta=fit_gaussian,
    )
)
