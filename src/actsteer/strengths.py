"""Strengths λ: the one grammar for writing them, and the one rule for resolving them.

Grammar (every command line `--strength`, sweeps): a number, "START:STOP:STEP" (STOP
included) or "a,b,c"; several such items make one list, duplicates dropped.

Rule (generation, evaluation, the CLI): no strengths means the steering's default strength;
without a steering every λ must be 0 (the plain model) and no support can be chosen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from actsteer.errors import ActSteerError
from actsteer.steering import Steering


def parse_strengths(spec: str) -> list[float]:
    """λ values from "START:STOP:STEP" (STOP included), "a,b,c", or one number."""
    text = spec.strip()
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
        else:
            return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ActSteerError(
            f"cannot read strengths {spec!r}: use START:STOP:STEP (e.g. 0:1:0.1), "
            "a comma-separated list, or one number"
        ) from None
    if not step > 0 or stop < start:
        raise ActSteerError(
            f"strength range {spec!r} needs STEP > 0 and STOP ≥ START (e.g. 0:1:0.25)"
        )
    count = int((stop - start) / step + 1e-9) + 1
    return [round(start + i * step, 10) for i in range(count)]


def parse_strength_specs(specs: Iterable[str]) -> list[float]:
    """λ values from several items of the grammar, in order, each value once."""
    values = [value for spec in specs for value in parse_strengths(spec)]
    return list(dict.fromkeys(values))


def resolve_strengths(
    steering: Steering | None,
    strengths: Sequence[float] | float | None = None,
    *,
    support: str | None = None,
    needs: str = "a steering to apply",
) -> list[float]:
    """The strengths to run: [0] without a steering, else the given ones (range-checked).

    None means the steering's default strength. Without a steering, a λ other than 0 or a
    support is an error saying it `needs` one (the CLI names its --steering option there).
    """
    if strengths is None:
        strengths = [0.0] if steering is None else [steering.info.default_strength]
    elif isinstance(strengths, int | float):
        strengths = [strengths]
    values = [float(s) for s in strengths]
    if not values:
        raise ActSteerError("give at least one strength")
    if any(not math.isfinite(s) for s in values):
        raise ActSteerError(f"strengths must be finite numbers, got {values}")
    if steering is None:
        if any(s != 0.0 for s in values):
            raise ActSteerError(f"strengths other than 0 need {needs}")
        if support is not None:
            raise ActSteerError(f"a support needs {needs}")
    else:
        steering.check_strength(torch.tensor(values, dtype=torch.float64))
    return values
