"""A budget instead of λ: the strength a request may spend, read off the artifact's calibration.

`actsteer calibrate` stores in the artifact the curve it measured, every (λ, cost) it evaluated
(SteeringInfo.calibration). A request that gives a budget — `{"max_delta_ppl": 1.0}` (perplexity
points on held-out text) or `{"max_kl": 0.05}` (nats) — gets the largest λ the curve shows
within it: the curve is walked from λ = 0 up to its first point over the budget, and λ is
interpolated linearly between that point and the last one within (the curve's largest λ where
none is over). A budget of the other cost than the curve's, or an artifact without a curve, is
refused with what to do instead. The server (`actsteer serve`) and the vLLM plugin both call
`strength_for_budget`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from actsteer.errors import ActSteerError
from actsteer.steering import Steering

#: A request's budget keys and the calibration cost each reads.
BUDGET_KEYS = {"max_delta_ppl": "ppl", "max_kl": "kl"}
#: How `actsteer calibrate` measures each cost (for the messages).
CALIBRATE_FLAGS = {"ppl": "--budget-ppl", "kl": "--budget-kl"}


def strength_for_budget(name: str, steering: Steering, budget: object) -> float:
    """λ for steering `name` under `budget` ({"max_delta_ppl": x} or {"max_kl": x}, x ≥ 0),
    from its stored calibration curve (see the module)."""
    if not isinstance(budget, Mapping) or len(budget) != 1:
        raise ActSteerError(
            f"steering {name!r}: give a number for λ, or a budget as one of "
            f'{{"max_delta_ppl": 1.0}} or {{"max_kl": 0.05}}, got {budget!r}'
        )
    [(key, value)] = budget.items()
    cost = BUDGET_KEYS.get(key)
    if cost is None:
        raise ActSteerError(
            f"steering {name!r}: unknown budget {key!r}; use max_delta_ppl or max_kl"
        )
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ActSteerError(f"steering {name!r}: {key} must be a number ≥ 0, got {value!r}")
    calibration = steering.info.calibration or {}
    curve = calibration.get("curve")
    if not curve:
        raise ActSteerError(
            f"steering {name!r} has no calibration curve to read a budget from: run `actsteer "
            f"calibrate {CALIBRATE_FLAGS[cost]} …` on it and serve the calibrated file, or give λ"
        )
    if calibration.get("cost") != cost:
        other = next(k for k, c in BUDGET_KEYS.items() if c == calibration.get("cost"))
        raise ActSteerError(
            f"steering {name!r} was calibrated by {calibration.get('cost')}, so it takes "
            f"{other}, not {key} (or recalibrate it with {CALIBRATE_FLAGS[cost]})"
        )
    return along_curve([(float(s), c) for s, c in curve], float(value))


def along_curve(curve: list[tuple[float, float | None]], budget: float) -> float:
    """The largest λ within `budget` on a curve of (λ, cost) sorted by λ (cost None: not
    finite, over any budget), interpolated at the first crossing."""
    last_strength, last_cost = 0.0, 0.0
    for strength, cost in curve:
        if cost is None or not math.isfinite(cost):
            return last_strength
        if cost > budget:  # > budget ≥ last_cost
            share = (budget - last_cost) / (cost - last_cost)
            return last_strength + share * (strength - last_strength)
        last_strength, last_cost = strength, max(cost, last_cost)
    return last_strength
