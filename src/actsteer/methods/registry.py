"""The registry of steering methods and the contract each one fulfils.

Importing it, or a method's file, needs no torch (torch is imported when a method is used), so
`actsteer methods` and `--help` answer at once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actsteer.errors import ActSteerError

if TYPE_CHECKING:
    import torch

    from actsteer.maps import UnitMap

FitFunction = Callable[["torch.Tensor", "torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]]
#: Estimates a map of another kind than affine from (N, D) source and (M, D) target samples
#: (its bounds are added by Method.fit).
FitMapFunction = Callable[["torch.Tensor", "torch.Tensor"], "UnitMap"]
#: Trains the maps of all modules jointly: (model, tokenizer, source, target, names, info,
#: settings (actsteer.modes.EndToEnd), *, batch_size, budget_mb, progress, gating) →
#: ({name: UnitMap}, {name: actsteer.gates.Gate}: trained with the maps where `gating` is
#: given).
TrainFunction = Callable[..., tuple[dict[str, "UnitMap"], dict[str, Any]]]
#: The modes a closed-form method is fitted in (actsteer.modes), its default first.
CLOSED_FORM = ("independent", "sequential", "denoising")


def _imported(function: Callable | str) -> Any:
    """A function given itself or as "module:function" (imported when first used)."""
    if callable(function):
        return function
    module, _, name = function.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Method:
    """A named estimator and how it is fitted: one of `fit_omega_beta(source, target)`, which
    gives ω, β of shape (D,) for one module from its samples, `fit_map(source, target)`, which
    gives a map of another kind (actsteer.maps.UnitMap; both in the closed-form modes:
    independent, sequential, denoising), and `train`, which fits every module's map at once
    through the model (mode end-to-end: LinEAS). Each may be given as "module:function",
    imported when first used.

    strength_range bounds λ at apply time (None: unbounded); default_support and
    default_pooling are used unless the user chooses; min_samples is the fewest texts per set
    the estimator accepts (1 for a single prompt pair). reliable_texts and probe give the
    small-data rule (`small_data`).
    """

    name: str
    description: str
    fit_omega_beta: FitFunction | str | None = None
    fit_map: FitMapFunction | str | None = None
    train: TrainFunction | str | None = None
    strength_range: tuple[float, float] | None = (0.0, 1.0)
    default_support: str = "q0-100"
    default_pooling: str = "mean"
    min_samples: int = 2
    reliable_texts: int = 32
    probe: bool = False

    def __post_init__(self) -> None:
        given = [f for f in (self.fit_omega_beta, self.fit_map, self.train) if f is not None]
        if len(given) != 1:
            raise ValueError(f"method {self.name!r}: give one of fit_omega_beta, fit_map, train")

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this method is fitted in (actsteer.modes), its default first."""
        return CLOSED_FORM if self.train is None else ("end-to-end",)

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

    def fit(self, source: torch.Tensor, target: torch.Tensor, what: str = "samples") -> UnitMap:
        """Estimate one module's map from its (N, D) source and (M, D) target samples."""
        from actsteer.maps import AffineMap, check_samples, support_bounds

        if self.train is not None:
            raise ActSteerError(
                f"{self.name} trains all modules' maps jointly through the model and has no "
                f"per-module estimate; fit it with actsteer.fit(model, tok, source=..., "
                f"target=..., method={self.name!r})"
            )
        check_samples(source, target, what, self.min_samples)
        if self.fit_map is not None:
            amap: UnitMap = _imported(self.fit_map)(source.float(), target.float())
            amap.bounds = support_bounds(source)
            return amap
        assert self.fit_omega_beta is not None  # the one left of the three
        omega, beta = _imported(self.fit_omega_beta)(source.float(), target.float())
        return AffineMap(omega, beta, support_bounds(source))

    def trainer(self) -> TrainFunction:
        """`train` as a function (fitting.fit calls it for mode end-to-end)."""
        assert self.train is not None, f"{self.name} is estimated in closed form"
        found: TrainFunction = _imported(self.train)
        return found

    def check_strength(
        self, strength: float | Sequence[float] | torch.Tensor, upper: float | None = None
    ) -> None:
        """Raise a clear error when λ lies outside this method's range (its upper end raised to
        `upper` when the caller extrapolates on purpose)."""
        import torch

        values = torch.as_tensor(strength, dtype=torch.float64)
        if not torch.isfinite(values).all():
            raise ActSteerError(f"strength must be finite, got {strength}")
        if self.strength_range is None:
            return
        lo, hi = self.strength_range
        hi = max(hi, upper) if upper is not None else hi
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
