"""The per-unit affine map T(a) = ω ⊙ a + β with its supports: applying, inverting, and what
the estimators share (checks of samples, the monotone coupling, support bounds).

Pure torch; knows nothing about models. Samples are (N, D) tensors: N samples of D units. The
estimators themselves are files of actsteer.methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from actsteer.choices import SUPPORT_ALL, SUPPORT_QUANTILES, check_choice
from actsteer.errors import ActSteerError
from actsteer.transport import Transport, coefficients


@dataclass
class AffineMap:
    """ω, β of shape (D,), plus per-support (lo, hi) bounds of shape (D,)."""

    omega: torch.Tensor
    beta: torch.Tensor
    bounds: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.omega.shape[0]

    def support(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(lo, hi) of a support by name; None for the unbounded support "all"."""
        if name == SUPPORT_ALL:
            return None
        check_choice(name, [*sorted(self.bounds), SUPPORT_ALL], "support")
        return self.bounds[name]

    def at(self, strength: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The map at strength λ: (ω̃, λβ) with ω̃ = 1 + λ(ω − 1), so T_λ(a) = ω̃ ⊙ a + λβ
        (actsteer.transport.coefficients). λ is a number, giving (D,) tensors, or a (B,)
        tensor of per-row strengths, giving (B, D) tensors."""
        return coefficients(self.omega.float() - 1, self.beta.float(), strength)

    def transport(self, support: str = SUPPORT_ALL, fused: bool = True) -> Transport:
        """This map ready to apply with a support (actsteer.transport)."""
        return Transport(self.omega, self.beta, self.support(support), fused)

    def __call__(
        self, a: torch.Tensor, strength: float | torch.Tensor = 1.0, support: str = SUPPORT_ALL
    ) -> torch.Tensor:
        """T_λ(a) = a + λ(T(a) − a) inside the open support, a outside it: units on the last
        axis of any shape, one λ or one per row (shaped (B,) or (B, 1, …, 1))."""
        transport = self.transport(support)
        lam = torch.as_tensor(strength, dtype=torch.float32)
        if lam.ndim == 0:
            return transport(a.reshape(-1, self.dim), lam).view(a.shape)
        rows = lam.reshape(-1)
        return transport(a.reshape(rows.shape[0], -1, self.dim), rows).view(a.shape)

    def inverse(self) -> AffineMap:
        """T⁻¹(b) = (b − β)/ω, whose supports are the images of this map's supports.

        Units with |ω| ≈ 0 collapse every input to one value and cannot be inverted: an error.
        """
        if (self.omega.abs() < 1e-8).any():
            bad = int((self.omega.abs() < 1e-8).nonzero()[0])
            raise ActSteerError(f"map is not invertible: unit {bad} has ω ≈ 0")
        omega = 1 / self.omega
        beta = -self.beta / self.omega
        bounds = {}
        for name, (lo, hi) in self.bounds.items():
            a, b = self.omega * lo + self.beta, self.omega * hi + self.beta
            # Widen by a few float32 ulps so the images of the bounds themselves stay inside.
            slack = 4 * torch.finfo(torch.float32).eps * (a.abs().maximum(b.abs()) + 1)
            bounds[name] = (torch.minimum(a, b) - slack, torch.maximum(a, b) + slack)
        return AffineMap(omega, beta, bounds)


def check_samples(
    source: torch.Tensor, target: torch.Tensor, what: str = "samples", min_samples: int = 2
) -> None:
    """Raise a clear error for sample sets a map cannot be estimated from."""
    for name, x in (("source", source), ("target", target)):
        if x.ndim != 2:
            raise ActSteerError(
                f"{name} {what} must be (samples, units), got shape {tuple(x.shape)}"
            )
        if x.shape[0] < min_samples:
            raise ActSteerError(
                f"{name} has {x.shape[0]} sample(s) for {what}; at least {min_samples} are needed "
                "to estimate a distribution (use more prompts)"
            )
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).any(dim=1).nonzero()[0].item()
            raise ActSteerError(
                f"{name} {what} contain NaN or infinite activations (first at sample {bad}); "
                "the model overflowed or produced NaN: try dtype=float32 or check the inputs"
            )
    if source.shape[1] != target.shape[1]:
        raise ActSteerError(
            f"source and target {what} have different widths: "
            f"{source.shape[1]} vs {target.shape[1]}"
        )


def _at_positions(sorted_x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows of column-sorted samples at fractional row positions, linearly interpolated."""
    n = sorted_x.shape[0]
    below = pos.floor().long().clamp(0, n - 1)
    above = (below + 1).clamp(max=n - 1)
    frac = (pos - below).to(sorted_x.dtype).unsqueeze(1)
    return sorted_x[below] + frac * (sorted_x[above] - sorted_x[below])


def quantile_grid(sorted_x: torch.Tensor, size: int) -> torch.Tensor:
    """Empirical quantile function of column-sorted samples at `size` evenly spaced levels.

    Returns sorted_x itself when size equals the sample count, so equal counts mean plain sorting.
    """
    n = sorted_x.shape[0]
    if size == n:
        return sorted_x
    return _at_positions(sorted_x, torch.linspace(0, n - 1, size, dtype=torch.float64))


def couple(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The monotone (1-D optimal transport) coupling of every unit at once.

    Both sets are sorted along the sample axis; unequal counts are matched on a common
    quantile grid of max(N, M) levels.
    """
    x = source.sort(dim=0).values
    y = target.sort(dim=0).values
    size = max(x.shape[0], y.shape[0])
    return quantile_grid(x, size), quantile_grid(y, size)


def support_bounds(source: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit quantile bounds of the source samples for every named support."""
    sorted_x = source.float().sort(dim=0).values
    levels = sorted({q for pair in SUPPORT_QUANTILES.values() for q in pair})
    pos = torch.tensor(levels, dtype=torch.float64) / 100 * (sorted_x.shape[0] - 1)
    at = dict(zip(levels, _at_positions(sorted_x, pos), strict=True))
    return {name: (at[lo], at[hi]) for name, (lo, hi) in SUPPORT_QUANTILES.items()}
