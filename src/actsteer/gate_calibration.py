"""Calibrating a gated steering: its strength λ and its gates' threshold θ, chosen together.

For each candidate threshold, `calibrate` finds the largest λ within the budget (ΔPPL on
held-out WikiText, or KL; λ beyond the method's range only where the steering was
`extrapolated`); the pair kept is the one whose effect on held-out source and target texts
(`likelihood_gap`: how much likelier target lines become than source lines) is largest at its
λ — at matched cost. Each candidate also reports the share of neutral tokens (the cost's own
WikiText, the window after the one the budget reads) whose gate is above one half, i.e. how much
of ordinary text the steering still touches. Evaluation prompts are never read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from actsteer.calibration import CalibrationResult, calibrate, check_budget, likelihood_gap
from actsteer.choices import CALIBRATION_PASSAGES, PERPLEXITY_TOKENS, PERPLEXITY_WINDOW
from actsteer.errors import ActSteerError
from actsteer.evaluation.tasks.perplexity import data_source, load_wikitext, tokens_for_budget
from actsteer.tree import model_device

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from actsteer.steering import Steering

#: Thresholds tried by default, in the gates' log-odds.
THRESHOLDS = (-1.0, 0.0, 1.0, 2.0)


@dataclass
class GateCandidate:
    """One threshold, calibrated: its λ, held-out effect and share of neutral tokens gated."""

    threshold: float
    calibration: CalibrationResult
    effect: float
    neutral_open: float


@dataclass
class GateCalibration:
    """Every candidate (in the order tried) and the best one (largest effect at matched cost)."""

    candidates: list[GateCandidate]
    best: GateCandidate

    @property
    def steering(self) -> Steering:
        """The best candidate's steering: its threshold and its calibrated default strength."""
        return self.best.calibration.steering


def calibrate_gate(
    steering: Steering,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    budget: float = 1.0,
    *,
    held_out: tuple[Sequence[str], Sequence[str]],
    thresholds: Sequence[float] = THRESHOLDS,
    on_candidate: Callable[[GateCandidate], None] | None = None,
    **options: Any,
) -> GateCalibration:
    """λ and threshold of a gated steering under `budget` (see the module). held_out: source
    and target texts the fit never saw; options go to `calibrate` (cost, data, passages, …)."""
    if steering.gate_settings is None:
        raise ActSteerError("the steering has no gate; add one with steering.with_gate(...)")
    if not thresholds:
        raise ActSteerError("give at least one threshold")
    check_budget(budget, options.get("cost", "ppl"))
    held_source, held_target = list(held_out[0]), list(held_out[1])
    batch_size = options.get("batch_size", 8)
    plain_gap = likelihood_gap(model, tokenizer, held_source, held_target, batch_size)
    neutral = neutral_ids(tokenizer, options)
    results = []
    for threshold in dict.fromkeys(float(t) for t in thresholds):
        candidate = steering.with_gate_settings(threshold=threshold)
        calibration = calibrate(candidate, model, tokenizer, budget, **options)
        chosen = calibration.steering
        with chosen.applied(model, calibration.strength, chosen.info.support) as handle:
            gap = likelihood_gap(model, tokenizer, held_source, held_target, batch_size)
            with torch.no_grad():
                model(input_ids=neutral.to(model_device(model)))
            gates = [source.last for source in handle.gates.values() if source.last is not None]
        share = float(torch.stack([(g > 0.5).float().mean() for g in gates]).mean())
        result = GateCandidate(threshold, calibration, gap - plain_gap, share)
        results.append(result)
        if on_candidate is not None:
            on_candidate(result)
    best = max(results, key=lambda c: c.effect)
    summary = best.calibration.steering.info.calibration or {}
    summary = {
        **summary,
        "gate": {
            "thresholds": [[c.threshold, c.calibration.strength, c.effect, c.neutral_open]
                           for c in results],
            "held_out": {"source": len(held_source), "target": len(held_target)},
            "neutral_open": best.neutral_open,
        },
    }  # fmt: skip
    chosen = best.calibration.steering
    best.calibration.steering = replace(chosen, info=replace(chosen.info, calibration=summary))
    return GateCalibration(results, best)


def neutral_ids(tokenizer: PreTrainedTokenizerBase, options: dict[str, Any]) -> torch.Tensor:
    """One window of the cost's WikiText after the passages the budget reads: (1, window)."""
    window = options.get("passage_tokens", PERPLEXITY_WINDOW)
    start = (
        options.get("offset", PERPLEXITY_TOKENS)
        + options.get("passages", CALIBRATION_PASSAGES) * window
    )
    ids = tokens_for_budget(
        tokenizer, load_wikitext(data_source(options.get("data"))), start + window
    )
    if len(ids) < start + window:
        raise ActSteerError("the calibration text is too short for a window of neutral tokens")
    return torch.tensor([ids[start : start + window]])
