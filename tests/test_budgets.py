"""A budget instead of λ (actsteer.budgets): read off the artifact's calibration curve.

On any increasing curve the λ chosen costs at most the budget by the curve's own linear
interpolation, and a larger budget never gives a smaller λ; the vLLM plugin's request parser
gives the same λ as the server; what the artifact cannot answer is refused, saying what to do.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from actsteer import ActSteerError, Steering, SteeringInfo
from actsteer.budgets import along_curve, strength_for_budget
from actsteer.integrations.batch import parse_request
from actsteer.maps import AffineMap

increments = st.lists(st.tuples(st.floats(0.01, 1.0), st.floats(0.0, 2.0)), min_size=1, max_size=12)


def curve_of(steps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """An increasing (λ, cost) curve from positive λ steps and non-negative cost steps."""
    points, strength, cost = [], 0.0, 0.0
    for d_strength, d_cost in steps:
        strength, cost = strength + d_strength, cost + d_cost
        points.append((strength, cost))
    return points


def cost_at(curve: list[tuple[float, float]], strength: float) -> float:
    """The curve's cost at λ by linear interpolation from (0, 0)."""
    last = (0.0, 0.0)
    for point in curve:
        if strength <= point[0]:
            share = (strength - last[0]) / (point[0] - last[0])
            return last[1] + share * (point[1] - last[1])
        last = point
    return last[1]


@given(increments, st.floats(0.0, 10.0), st.floats(0.0, 10.0))
def test_the_lambda_of_a_budget_stays_within_it_and_grows_with_it(steps, budget, more):
    curve = curve_of(steps)
    lam = along_curve(curve, budget)
    assert 0.0 <= lam <= curve[-1][0]
    assert cost_at(curve, lam) <= budget + 1e-9
    assert along_curve(curve, budget + more) >= lam - 1e-12
    if budget >= curve[-1][1]:
        assert lam == curve[-1][0], "the whole curve within: its largest λ"


def test_a_point_that_could_not_be_measured_ends_the_curve():
    assert along_curve([(0.5, 0.2), (1.0, None), (2.0, 0.3)], 1.0) == 0.5
    assert along_curve([(0.5, 0.2), (1.0, 0.6)], 0.4) == pytest.approx(0.75)


def steering(calibration: dict | None) -> Steering:
    amap = AffineMap(torch.full((4,), 0.5), torch.ones(4))
    return Steering({"layer": amap}, SteeringInfo(method="linear-act", calibration=calibration))


KL_CURVE = {"cost": "kl", "curve": [[0.0, 0.0], [0.5, 0.02], [1.0, 0.08]]}


def test_the_vllm_plugin_reads_a_budget_as_the_server_does():
    served = {"detox": steering(KL_CURVE)}
    spec = parse_request({"detox": {"max_kl": 0.05}}, served)
    assert spec == (("detox", strength_for_budget("detox", served["detox"], {"max_kl": 0.05})),)
    assert spec[0][1] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("calibration", "budget", "message"),
    [
        (None, {"max_kl": 0.1}, "no calibration curve .* `actsteer calibrate --budget-kl"),
        (KL_CURVE, {"max_delta_ppl": 1.0}, "calibrated by kl, so it takes max_kl"),
        (KL_CURVE, {"max_tokens": 1.0}, "unknown budget 'max_tokens'"),
        (KL_CURVE, {"max_kl": -0.1}, "max_kl must be a number ≥ 0"),
        (KL_CURVE, {"max_kl": True}, "max_kl must be a number ≥ 0"),
        (KL_CURVE, {"max_kl": 0.1, "max_delta_ppl": 1}, "give a number for λ, or a budget"),
    ],
)
def test_budgets_the_artifact_cannot_answer_are_refused(calibration, budget, message):
    with pytest.raises(ActSteerError, match=message):
        strength_for_budget("detox", steering(calibration), budget)
    with pytest.raises(ActSteerError, match=message):
        parse_request({"detox": budget}, {"detox": steering(calibration)})
