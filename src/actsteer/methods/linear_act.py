"""Linear-AcT: per-unit 1-D optimal transport (monotone coupling) fitted by least squares."""

from __future__ import annotations

from typing import TYPE_CHECKING

from actsteer.methods.registry import Method, register

if TYPE_CHECKING:
    import torch

#: A unit whose coupled source samples vary less than this (relative) is flat: ω = 1.
ZERO_VARIANCE = 1e-12


def fit_linear(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares y ≈ ω x + β on the coupled pairs (actsteer.maps.couple), per unit, in
    float64; a flat unit gets ω = 1, β = m_y − m_x."""
    import torch

    from actsteer.maps import couple

    x, y = (t.double() for t in couple(source, target))
    mx, my = x.mean(0), y.mean(0)
    dx, dy = x - mx, y - my
    var = (dx * dx).sum(0)
    cov = (dx * dy).sum(0)
    flat = var <= ZERO_VARIANCE * x.shape[0] * (1 + mx.abs()) ** 2
    omega = torch.where(flat, torch.ones_like(var), cov / torch.where(flat, 1.0, var))
    beta = my - omega * mx
    return omega.float(), beta.float()


LINEAR_ACT = register(
    Method(
        name="linear-act",
        description="per-unit affine map fitted on the sorted (optimal transport) coupling",
        fit_omega_beta=fit_linear,
    )
)
