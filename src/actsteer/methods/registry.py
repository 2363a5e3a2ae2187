"""The registry of steering methods and the contract each one fulfils.

Importing it, or a method's file, needs no torch (torch is imported when a method is used), so
`actsteer methods` and `--help` answer at once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from actsteer.errors import ActSteerError

if TYPE_CHECKING:
    import torch

    from actsteer.maps import AffineMap

FitFunction = Callable[["torch.Tensor", "torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]]


@dataclass(frozen=True)
class Method:
    """A named estimator: `fit_omega_beta(source, target)` gives ω, β of shape (D,); it may be
    given as "module:function", imported when first used.

    strength_range bounds λ at apply time (None: unbounded); default_support and
    default_pooling are used unless the user chooses; min_samples is the fewest texts per set
    the estimator accepts (1 for a single prompt pair). trained: the maps of all modules are
    trained jointly through the model by `fit` (end to end: actsteer.lineas) instead of being
    estimated module by module; fit_omega_beta then only explains that. reliable_texts and
    probe give the small-data rule (`small_data`).
    """

    name: str
    description: str
    fit_omega_beta: FitFunction | str
    strength_range: tuple[float, float] | None = (0.0, 1.0)
    default_support: str = "q0-100"
    default_pooling: str = "mean"
    min_samples: int = 2
    trained: bool = False
    reliable_texts: int = 32
    probe: bool = False

    def small_data(self, n_source: int, n_target: int, units: int) -> str | None:
        """Why a fit on this much data is unreliable, or None. The rule: a per-unit estimator
        (sorting, means, variances, AUROC) needs about `reliable_texts` texts per set for its
        1-D estimates to settle; a probe over all units (`probe`, ITI-c) needs more texts in
        both sets together than units, or any labelling is separable and its direction is
        noise. ActAdd (reliable_texts = 0) is meant for a single pair."""
        if self.probe and n_source + n_target <= units:
            return (
                f"{n_source} + {n_target} texts for a probe over {units} units: with no more "
                "texts than units any split is separable and the direction is noise; give more "
                f"than {units} texts in all"
            )
        smallest = min(n_source, n_target)
        if not self.probe and smallest < self.reliable_texts:
            return (
                f"{smallest} texts in the smaller set; {self.name}'s per-unit estimates need "
                f"about {self.reliable_texts} per set to be stable"
            )
        return None

    def fit(self, source: torch.Tensor, target: torch.Tensor, what: str = "samples") -> AffineMap:
        """Estimate the map from (N, D) source and (M, D) target samples."""
        from actsteer.maps import AffineMap, check_samples, support_bounds

        check_samples(source, target, what, self.min_samples)
        omega, beta = self.estimator()(source.float(), target.float())
        return AffineMap(omega, beta, support_bounds(source))

    def estimator(self) -> FitFunction:
        """fit_omega_beta as a function (imported if given by name)."""
        if callable(self.fit_omega_beta):
            return self.fit_omega_beta
        module, _, function = self.fit_omega_beta.partition(":")
        found: FitFunction = getattr(importlib.import_module(module), function)
        return found

    def check_strength(
        self, strength: float | Sequence[float] | torch.Tensor, upper: float | None = None
    ) -> None:
        """Raise a clear error when λ lies outside this method's range (its upper end raised to
        `upper` when the caller extrapolates on purpose)."""
        if self.strength_range is None:
            return
        import torch

        lo, hi = self.strength_range
        hi = max(hi, upper) if upper is not None else hi
        values = torch.as_tensor(strength, dtype=torch.float64)
        if not torch.isfinite(values).all():
            raise ActSteerError(f"strength must be finite, got {strength}")
        if (values < lo).any() or (values > hi).any():
            raise ActSteerError(
                f"strength {values.tolist()} is outside [{lo:g}, {hi:g}], the range of "
                f"method {self.name!r}; pick λ in that range (0 = untouched model, 1 = full "
                "effect), or extrapolate on purpose with steering.extrapolated(UPPER) "
                "(CLI: --extrapolate UPPER on generate, eval and sweep)"
            )


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry under its name."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called `name`, or a clear error listing those that exist."""
    try:
        return METHODS[name]
    except KeyError:
        raise ActSteerError(
            f"unknown method {name!r}; available methods: {', '.join(sorted(METHODS))}"
        ) from None
