"""How a steering is fitted: one settings object per mode, so each setting belongs to the mode
it applies to.

    Independent  closed form; each module's map from the plain model's activations
    Sequential   closed form; each module's map from activations that the maps of every
                 upstream module already moved (λ = 1, the fit's support)
    EndToEnd     all maps trained jointly through the frozen model (LinEAS)
    Denoising    closed form on a diffusers pipeline's activations over denoising runs

`fit(..., mode=...)` takes one of these, or its name for the defaults. A method says which
modes it can be fitted in (`Method.modes`). Kept free of torch: `--help` shows the defaults.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from actsteer.choices import POOLINGS, check_choice
from actsteer.deprecation import warn_renamed
from actsteer.errors import ActSteerError

#: LinEAS's defaults (measured on SmolLM2-135M, post-attn-ln, 32+32 texts: docs/benchmarks.md).
DEFAULT_TRAINING_STEPS = 100
DEFAULT_LEARNING_RATE = 0.02
#: The sparse-group-lasso strength by default: on texts it never saw, LinEAS at 1 moved
#: held-out source texts closest to the target in 3 of 4 (data set, draw of 32 + 32 fit texts)
#: cases and within 0.012 of the closest in the fourth (docs/benchmarks.md, "LinEAS on unseen
#: texts"); 0 is no penalty.
DEFAULT_SPARSITY = 1.0
INITS = ("identity", "linear-act")


@dataclass(frozen=True)
class Independent:
    """Each module fitted alone on the plain model's activations.

    support_pooling: how the source samples that the support's bounds come from are pooled
    (None: the fit's pooling). "all" takes them from token activations while the map is fitted
    on pooled samples, so a q-support covers the tokens it is applied to.
    """

    name: ClassVar[str] = "independent"
    support_pooling: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.support_pooling, POOLINGS, "support_pooling")


@dataclass(frozen=True)
class Sequential:
    """Each module fitted on activations of both sets recorded with the maps of every module
    before it applied (λ = 1, the fit's support): the paper's causal estimator."""

    name: ClassVar[str] = "sequential"


@dataclass(frozen=True)
class EndToEnd:
    """All maps trained jointly by gradient descent through the frozen model (LinEAS; see
    actsteer.lineas for the loss and the penalty).

    training_steps: Adam steps; learning_rate: Adam's; sparsity: the sparse-group-lasso
    strength (DEFAULT_SPARSITY; 0 = no penalty); seed: the order of the texts per step (and the
    held-out split); init: "identity" or "linear-act" (start from the closed-form maps);
    texts_per_step: source texts per step; held_out: the share of each set's texts kept out of
    training, on which the maps of the step with the smallest distance are chosen (0: the last
    step's maps).
    """

    name: ClassVar[str] = "end-to-end"
    training_steps: int = DEFAULT_TRAINING_STEPS
    learning_rate: float = DEFAULT_LEARNING_RATE
    sparsity: float = DEFAULT_SPARSITY
    seed: int = 0
    init: str = "identity"
    texts_per_step: int = 32
    held_out: float = 0.0

    def __post_init__(self) -> None:
        for key in ("training_steps", "texts_per_step"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ActSteerError(f"{key} must be a whole number ≥ 1, got {value!r}")
            if value < 1:
                raise ActSteerError(f"{key} must be ≥ 1, got {value}")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ActSteerError(
                f"learning_rate must be a finite number > 0, got {self.learning_rate}"
            )
        if not math.isfinite(self.sparsity) or self.sparsity < 0:
            raise ActSteerError(
                f"sparsity must be a finite number ≥ 0 (0 = no penalty), got {self.sparsity}"
            )
        if not 0 <= self.held_out < 1:
            raise ActSteerError(
                f"held_out must be a share of the texts, 0 ≤ held_out < 1, got {self.held_out}"
            )
        if self.init not in INITS:
            raise ActSteerError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")


@dataclass(frozen=True)
class Denoising:
    """A pipeline's activations recorded over denoising runs of the prompts.

    denoising_steps: scheduler steps per run; guidance_scale: classifier-free guidance;
    every: record every k-th step; seed: of the runs' noise; batch_size: prompts per run;
    options: further keywords of the pipeline's call (height, width, …).
    """

    name: ClassVar[str] = "denoising"
    denoising_steps: int = 20
    guidance_scale: float = 5.0
    every: int = 2
    seed: int = 0
    batch_size: int = 8
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, **keywords: Any) -> Denoising:
        """Settings from keywords: this class's fields by name, every other keyword (height,
        width, …) as the pipeline's options."""
        names = {f.name for f in dataclasses.fields(cls)} - {"options"}
        settings = {k: v for k, v in keywords.items() if k in names}
        options = {k: v for k, v in keywords.items() if k not in names}
        return cls(**settings, options=options)

    def recording(self) -> dict[str, Any]:
        """The keywords of `diffusion.record_pipeline`."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**settings.pop("options"), **settings}

    def description(self) -> dict[str, Any]:
        """What the steering's info.denoising records (everything but the batch size)."""
        return {k: v for k, v in self.recording().items() if k != "batch_size"}


FitMode = Independent | Sequential | EndToEnd | Denoising
MODES: dict[str, type[FitMode]] = {
    m.name: m for m in (Independent, Sequential, EndToEnd, Denoising)
}


def resolve_mode(mode: str | FitMode) -> FitMode:
    """A mode's settings: the object itself, or the defaults of the mode named."""
    if isinstance(mode, str):
        check_choice(mode, tuple(MODES), "mode")
        return MODES[mode]()
    if not isinstance(mode, Independent | Sequential | EndToEnd | Denoising):
        raise ActSteerError(
            f"mode must be a name ({', '.join(MODES)}) or one of actsteer.modes' settings, "
            f"got {type(mode).__name__}"
        )
    return mode


def given_fields(mode: FitMode) -> str:
    """The settings of `mode` that differ from its defaults, as "name=, name=" (for errors)."""
    default = type(mode)()
    changed = [
        f.name
        for f in dataclasses.fields(mode)
        if getattr(mode, f.name) != getattr(default, f.name)
    ]
    return ", ".join(f"{name}=" for name in changed) or f"mode {mode.name!r}"


#: fit's keywords before modes, by the mode they now belong to (and their new names).
RENAMED = {
    "steps": ("end-to-end", "training_steps"),
    "learning_rate": ("end-to-end", "learning_rate"),
    "sparsity": ("end-to-end", "sparsity"),
    "seed": ("end-to-end", "seed"),
    "init": ("end-to-end", "init"),
    "support_pooling": ("independent", "support_pooling"),
}


def from_old_keywords(
    old: dict[str, Any], pipeline_options: dict[str, Any] | None
) -> FitMode | None:
    """The mode that fit's old keywords (steps=, learning_rate=, …, pipeline_options=) ask
    for, with a DeprecationWarning; None when none was given."""
    given = {k: v for k, v in old.items() if v is not None}
    unknown = sorted(set(given) - set(RENAMED))
    if unknown:
        raise ActSteerError(f"fit() got an unexpected keyword argument {unknown[0]!r}")
    if pipeline_options is not None:
        if given:
            raise ActSteerError(
                f"{', '.join(f'{k}=' for k in given)} do not apply to pipelines: give "
                "mode=Denoising(...)"
            )
        options = dict(pipeline_options)
        if "steps" in options:
            options["denoising_steps"] = options.pop("steps")
        _deprecated("pipeline_options=", "mode=Denoising(...)")
        return Denoising.of(**options)
    if not given:
        return None
    targets = {RENAMED[k][0] for k in given}
    if len(targets) > 1:
        raise ActSteerError(
            f"{', '.join(f'{k}=' for k in given)} belong to different modes; give one mode"
        )
    (target,) = targets
    new = {RENAMED[k][1]: v for k, v in given.items()}
    spelled = ", ".join(f"{k}=…" for k in new)
    _deprecated(", ".join(f"{k}=" for k in given), f"mode={MODES[target].__name__}({spelled})")
    return MODES[target](**new)


def _deprecated(old: str, new: str) -> None:
    warn_renamed(f"fit({old})", f"fit({new}) (actsteer.modes)", stacklevel=5)
