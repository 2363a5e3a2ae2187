"""The maps with their supports — per unit affine, T(a) = ω ⊙ a + β, or piecewise-linear
monotone through knots (quantile-act), and joint across units in a subspace (joint-act) —
applying, inverting, and what the estimators share (checks of samples, the monotone coupling,
support bounds).

Pure torch; knows nothing about models. Samples are (N, D) tensors: N samples of D units. The
estimators themselves are files of actsteer.methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from actsteer.choices import SUPPORT_ALL, SUPPORT_QUANTILES, check_choice
from actsteer.errors import ActSteerError
from actsteer.transport import (
    AnyTransport,
    Bounds,
    KnotTransport,
    LowRankTransport,
    Transport,
    coefficients,
)


class UnitMap(ABC):
    """What every map of D units has: per-support (lo, hi) bounds of shape (D,), applying with
    a support, and its tensors by name (saved in the steering file and hashed in its digest).
    """

    bounds: dict[str, Bounds]
    #: The map's kind in messages and steering files.
    kind = ""

    @property
    @abstractmethod
    def dim(self) -> int:
        """D, the number of units."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The map's own tensors by name (not its bounds)."""

    @abstractmethod
    def transport(self, support: str = SUPPORT_ALL, fused: bool = True) -> AnyTransport:
        """This map ready to apply with a support (actsteer.transport)."""

    @abstractmethod
    def inverse(self) -> UnitMap:
        """The inverse map (an error where there is none)."""

    @abstractmethod
    def reach(self) -> torch.Tensor:
        """(D,) the largest |T(a) − a| over the source's range [lo, hi] of each unit (q0-100)."""

    @abstractmethod
    def line(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ω, β) of shape (D,), what `inspect` summarises: the map itself where it is affine
        per unit, else the least-squares line through its knots (quantile) or its matrix's
        diagonal and its shift (joint)."""

    def support(self, name: str) -> Bounds | None:
        """(lo, hi) of a support by name; None for the unbounded support "all"."""
        if name == SUPPORT_ALL:
            return None
        check_choice(name, [*sorted(self.bounds), SUPPORT_ALL], "support")
        return self.bounds[name]

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


@dataclass
class AffineMap(UnitMap):
    """ω, β of shape (D,), plus per-support (lo, hi) bounds of shape (D,)."""

    omega: torch.Tensor
    beta: torch.Tensor
    bounds: dict[str, Bounds] = field(default_factory=dict)
    kind = "affine"

    @property
    def dim(self) -> int:
        return self.omega.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"omega": self.omega, "beta": self.beta}

    def at(self, strength: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The map at strength λ: (ω̃, λβ) with ω̃ = 1 + λ(ω − 1), so T_λ(a) = ω̃ ⊙ a + λβ
        (actsteer.transport.coefficients). λ is a number, giving (D,) tensors, or a (B,)
        tensor of per-row strengths, giving (B, D) tensors."""
        return coefficients(self.omega.float() - 1, self.beta.float(), strength)

    def transport(self, support: str = SUPPORT_ALL, fused: bool = True) -> Transport:
        return Transport(self.omega, self.beta, self.support(support), fused)

    def line(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.omega, self.beta

    def reach(self) -> torch.Tensor:
        lo, hi = (b.float() for b in self.bounds["q0-100"])
        omega, beta = self.omega.float(), self.beta.float()
        return torch.maximum(((omega - 1) * lo + beta).abs(), ((omega - 1) * hi + beta).abs())

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


@dataclass
class QuantileMap(UnitMap):
    """A monotone piecewise-linear map per unit through K knot pairs: x (D, K) increasing
    (source quantiles), y (D, K) non-decreasing (target quantiles); linear between knots, the
    end segments extended past the outer ones. T_λ(a) = a + λ(T(a) − a)."""

    x: torch.Tensor
    y: torch.Tensor
    bounds: dict[str, Bounds] = field(default_factory=dict)
    kind = "quantile"

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.x.shape != self.y.shape or self.x.shape[1] < 2:
            raise ActSteerError(
                f"quantile knots must be two (units, K ≥ 2) tensors of one shape, got "
                f"{tuple(self.x.shape)} and {tuple(self.y.shape)}"
            )
        for name, knots in (("x", self.x), ("y", self.y)):
            falling = (knots[:, 1:] < knots[:, :-1]).any(dim=1)
            if falling.any() or not torch.isfinite(knots).all():
                bad = int(falling.nonzero()[0]) if falling.any() else -1
                raise ActSteerError(
                    f"quantile knots {name} must be finite and non-decreasing per unit"
                    + (f" (unit {bad} falls)" if bad >= 0 else "")
                )

    @property
    def dim(self) -> int:
        return self.x.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"knots.x": self.x, "knots.y": self.y}

    def transport(self, support: str = SUPPORT_ALL, fused: bool = True) -> KnotTransport:
        return KnotTransport(self.x, self.y, self.support(support), fused)

    def line(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.x.double(), self.y.double()
        dx, dy = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        var = (dx * dx).sum(1)
        omega = torch.where(var > 0, (dx * dy).sum(1) / var.clamp_min(1e-300), 1.0)
        beta = y.mean(1) - omega * x.mean(1)
        return omega.float(), beta.float()

    def reach(self) -> torch.Tensor:
        lo, hi = (b.float() for b in self.bounds["q0-100"])
        x = torch.cat([lo[:, None], self.x.float(), hi[:, None]], dim=1)
        moved = self.transport()(x.t().contiguous(), 1.0).t()
        return (moved - x).abs().amax(dim=1)

    def inverse(self) -> QuantileMap:
        """The map through the swapped knots, whose supports are the images of this map's.
        A unit whose target knots repeat maps an interval to one value: an error."""
        flat = (self.y[:, 1:] - self.y[:, :-1] <= 0).any(dim=1)
        if flat.any():
            bad = int(flat.nonzero()[0])
            raise ActSteerError(f"map is not invertible: unit {bad} maps an interval to one value")
        forward = self.transport()
        bounds = {}
        for name, (lo, hi) in self.bounds.items():
            ends = forward(torch.stack([lo, hi]).float(), 1.0)
            slack = 4 * torch.finfo(torch.float32).eps * (ends.abs().amax(dim=0) + 1)
            bounds[name] = (ends[0] - slack, ends[1] + slack)
        return QuantileMap(self.y, self.x, bounds)


#: The names of every kind of map's own tensors (`UnitMap.tensors`).
MAP_TENSORS = (
    "omega", "beta", "knots.x", "knots.y", "joint.mean", "joint.basis", "joint.core", "joint.delta",
)  # fmt: skip


@dataclass
class JointMap(UnitMap):
    """A map across units: T(a) = a + U(C Uᵀ(a − m) + δ), the identity off the r-dimensional
    subspace spanned by U's orthonormal columns (D, r), there the affine map z ↦ (I + C) z + δ
    of the coordinates z = Uᵀ(a − m) (C (r, r), δ (r,), m (D,)). T_λ(a) = a + λ(T(a) − a).
    A support other than "all" keeps, as for the per-unit maps, each unit of a token whose
    activation lies outside the source's range for that unit (bounds) where it was."""

    mean: torch.Tensor
    basis: torch.Tensor
    core: torch.Tensor
    delta: torch.Tensor
    bounds: dict[str, Bounds] = field(default_factory=dict)
    kind = "joint"

    def __post_init__(self) -> None:
        d, r = self.basis.shape if self.basis.ndim == 2 else (-1, -1)
        shapes = (self.mean.shape, self.core.shape, self.delta.shape)
        if d < 0 or shapes != ((d,), (r, r), (r,)):
            raise ActSteerError(
                "a joint map needs mean (D,), basis (D, r), core (r, r) and delta (r,), got "
                f"{tuple(self.mean.shape)}, {tuple(self.basis.shape)}, "
                f"{tuple(self.core.shape)}, {tuple(self.delta.shape)}"
            )

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "joint.mean": self.mean, "joint.basis": self.basis, "joint.core": self.core,
            "joint.delta": self.delta,
        }  # fmt: skip

    def transport(self, support: str = SUPPORT_ALL, fused: bool = True) -> LowRankTransport:
        return LowRankTransport(self.mean, self.basis, self.core, self.delta, self.support(support))

    def matrix(self, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, c) in float64 with T_λ(a) = M a + c: M = I + λ U C Uᵀ, c = λ U(δ − C Uᵀ m)."""
        basis, core = self.basis.double(), self.core.double()
        m = torch.eye(self.dim, dtype=torch.float64) + strength * basis @ core @ basis.t()
        c = strength * basis @ (self.delta.double() - core @ (basis.t() @ self.mean.double()))
        return m, c

    def line(self) -> tuple[torch.Tensor, torch.Tensor]:
        m, c = self.matrix(1.0)
        return m.diagonal().float(), c.float()

    def reach(self) -> torch.Tensor:
        lo, hi = (b.double() for b in self.bounds["q0-100"])
        m, c = self.matrix(1.0)
        change = m - torch.eye(self.dim, dtype=torch.float64)
        centre = change @ ((lo + hi) / 2) + c  # |linear| over a box: centre + half-widths
        return (centre.abs() + change.abs() @ ((hi - lo) / 2)).float()

    def inverse(self) -> JointMap:
        """z ↦ (I + C)⁻¹(z − δ) on the subspace, about m + Uδ (an error where I + C is
        singular): exact under support "all"; the bounds stay the forward map's (the image of
        a box of units under a map across units is no box)."""
        scale = torch.eye(self.core.shape[0], dtype=torch.float64) + self.core.double()
        if torch.linalg.matrix_rank(scale) < scale.shape[0]:
            raise ActSteerError("map is not invertible: it collapses a direction of its subspace")
        inverse_core = torch.linalg.inv(scale) - torch.eye(scale.shape[0], dtype=torch.float64)
        mean = self.mean.double() + self.basis.double() @ self.delta.double()
        return JointMap(
            mean.float(), self.basis, inverse_core.float(), -self.delta, dict(self.bounds)
        )


def from_tensors(tensors: dict[str, torch.Tensor], bounds: dict[str, Bounds]) -> UnitMap:
    """The map whose `tensors()` these are (KeyError when a tensor is missing)."""
    if "knots.x" in tensors or "knots.y" in tensors:
        return QuantileMap(tensors["knots.x"], tensors["knots.y"], bounds)
    if any(key.startswith("joint.") for key in tensors):
        mean, basis = tensors["joint.mean"], tensors["joint.basis"]
        return JointMap(mean, basis, tensors["joint.core"], tensors["joint.delta"], bounds)
    return AffineMap(tensors["omega"], tensors["beta"], bounds)


def affine_only(amap: UnitMap, use: str, instead: str) -> AffineMap:
    """`amap` where it is affine; else a clear error: `use` needs ω ⊙ a + β, do `instead`."""
    if isinstance(amap, AffineMap):
        return amap
    raise ActSteerError(
        f"{use} needs affine maps (T(a) = ω ⊙ a + β) and this steering's maps are {amap.kind} "
        f"(piecewise linear per unit, not affine); {instead}"
    )


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


def quantiles_at(sorted_x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The empirical quantile function of column-sorted samples at `levels` in [0, 1]
    (order statistics linearly interpolated): one row per level."""
    return _at_positions(sorted_x, levels.double() * (sorted_x.shape[0] - 1))


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
