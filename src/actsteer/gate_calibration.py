"""Calibrating a gated steering: its strength λ and its gates' threshold θ, chosen together.

For each candidate threshold, `calibrate` finds the largest λ within the budget (ΔPPL on
held-out WikiText, or KL; λ beyond the method's range only where the steering was
`extrapolated`); the pair kept is the one whose effect on held-out source and target texts
(`likelihood_gap`: how much likelier target lines become than source lines) is largest at its
λ — at matched cost. Each candidate also reports the share of neutral tokens (the cost's own
WikiText, the window after the one the budget reads) whose gate is above one half, i.e. how much
of ordinary text the steering still touches. Evaluation prompts are never read.

Thresholds can instead be given as neutral open shares (`open_shares`): for a share q each
module's gate is shifted so that a share q of its scores, as its kind sees them (a context
gate's running means), lie above θ = 0 on a neutral WikiText window (plain activations; the
window before the one the open share is reported on). One θ in raw log-odds opens modules very
unequally; a share per module does not (docs/benchmarks.md, gate study G2).

The effect can instead be the caller's (`effect(steering, strength) -> float`, larger is
better), e.g. minus the mean toxicity of sampled continuations of validation prompts
(`actsteer.evaluation.sampled_toxicity_effect`): the likelihood gap is measured with the
source text given, and a gate that opens on toxic tokens once they are there scores well on
it without steering the moment a sampled continuation turns toxic (gate studies G1 and G3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from actsteer.calibration import CalibrationResult, calibrate, check_budget, likelihood_gap
from actsteer.choices import CALIBRATION_PASSAGES, PERPLEXITY_TOKENS, PERPLEXITY_WINDOW
from actsteer.errors import ActSteerError
from actsteer.evaluation.tasks.perplexity import data_source, load_wikitext, tokens_for_budget
from actsteer.sources import prompt_scores
from actsteer.tree import model_device, module_tree, output_tensor

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from actsteer.steering import Steering

#: Thresholds tried by default, in the gates' log-odds.
THRESHOLDS = (-1.0, 0.0, 1.0, 2.0)


@dataclass
class GateCandidate:
    """One threshold, calibrated: its λ, held-out effect and share of neutral tokens gated
    (open_share: the neutral share the gates were centred on, where candidates are shares)."""

    threshold: float
    calibration: CalibrationResult
    effect: float
    neutral_open: float
    open_share: float | None = None


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
    held_out: tuple[Sequence[str], Sequence[str]] | None = None,
    effect: Callable[[Steering, float], float] | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    open_shares: Sequence[float] | None = None,
    on_candidate: Callable[[GateCandidate], None] | None = None,
    **options: Any,
) -> GateCalibration:
    """λ and threshold of a gated steering under `budget` (see the module). held_out: source
    and target texts the fit never saw, for the likelihood-gap effect; effect: the caller's
    effect instead (give one of the two); open_shares: candidates as neutral open shares per
    module instead of `thresholds`; options go to `calibrate` (cost, data, passages, …)."""
    if steering.gate_settings is None:
        raise ActSteerError("the steering has no gate; add one with steering.with_gate(...)")
    if open_shares is None and not thresholds:
        raise ActSteerError("give at least one threshold")
    if open_shares is not None and not (open_shares and all(0 < q < 1 for q in open_shares)):
        raise ActSteerError(f"give open shares strictly between 0 and 1, got {list(open_shares)}")
    check_budget(budget, options.get("cost", "ppl"))
    if held_out is not None and effect is None:
        measure = held_out_gap(model, tokenizer, held_out, options.get("batch_size", 8))
    elif effect is not None and held_out is None:
        measure = effect
    else:
        raise ActSteerError(
            "give either held_out (source and target texts the fit never saw) or effect"
        )
    neutral = neutral_ids(tokenizer, options)
    candidates: list[tuple[float, float | None, Steering]]
    if open_shares is None:
        candidates = [
            (t, None, steering.with_gate_settings(threshold=t))
            for t in dict.fromkeys(float(t) for t in thresholds)
        ]
    else:
        scores = neutral_scores(steering, model, neutral_ids(tokenizer, options, before=True))
        candidates = [
            (0.0, q, centred(steering, scores, q)) for q in dict.fromkeys(map(float, open_shares))
        ]
    results = []
    for threshold, share, candidate in candidates:
        calibration = calibrate(candidate, model, tokenizer, budget, **options)
        chosen = calibration.steering
        with chosen.applied(model, calibration.strength, chosen.info.support) as handle:
            with torch.no_grad():
                model(input_ids=neutral.to(model_device(model)))
            gates = [source.last for source in handle.gates.values() if source.last is not None]
        opened = float(torch.stack([(g > 0.5).float().mean() for g in gates]).mean())
        gained = float(measure(chosen, calibration.strength))
        result = GateCandidate(threshold, calibration, gained, opened, share)
        results.append(result)
        if on_candidate is not None:
            on_candidate(result)
    if not any(math.isfinite(c.effect) for c in results):
        tried = ", ".join(f"λ {c.calibration.strength:.3g}" for c in results)
        raise ActSteerError(
            f"no candidate has a finite effect ({tried}): a sampled effect scores −inf where "
            "the continuations lose fluency; extrapolate less, or relax its fluency_limit"
        )
    best = max(results, key=lambda c: c.effect)
    summary = best.calibration.steering.info.calibration or {}
    summary = {
        **summary,
        "gate": {
            "thresholds": [[c.threshold, c.calibration.strength, c.effect, c.neutral_open]
                           for c in results],
            **({"open_shares": [c.open_share for c in results]} if open_shares else {}),
            **(
                {"held_out": {"source": len(held_out[0]), "target": len(held_out[1])}}
                if held_out is not None
                else {"effect": getattr(effect, "__name__", "the caller's")}
            ),
            "neutral_open": best.neutral_open,
        },
    }  # fmt: skip
    chosen = best.calibration.steering
    best.calibration.steering = replace(chosen, info=replace(chosen.info, calibration=summary))
    return GateCalibration(results, best)


def held_out_gap(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    held_out: tuple[Sequence[str], Sequence[str]],
    batch_size: int,
) -> Callable[[Steering, float], float]:
    """The default effect: how much the steering at λ raises the held-out likelihood gap
    (target lines over source lines) above the plain model's, in nats."""
    source, target = list(held_out[0]), list(held_out[1])
    plain = likelihood_gap(model, tokenizer, source, target, batch_size)

    def gap(steering: Steering, strength: float) -> float:
        with steering.applied(model, strength, steering.info.support):
            return likelihood_gap(model, tokenizer, source, target, batch_size) - plain

    return gap


def neutral_scores(
    steering: Steering, model: nn.Module, ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each gate's scores on the neutral tokens `ids` (1, T) as its kind sees them (a token's
    own, the running mean, the mean), from the plain model's activations: {module: (T,)}."""
    kind = steering.gate_settings.kind if steering.gate_settings else "token"
    lookup = dict(module_tree(model).named_modules())
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        return lambda module, args, output: outputs.__setitem__(name, output_tensor(output))

    handles = [lookup[name].register_forward_hook(keep(name)) for name in steering.gates]
    try:
        with torch.no_grad():
            model(input_ids=ids.to(model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    scores = {name: gate.score(outputs[name]).cpu() for name, gate in steering.gates.items()}
    return {name: prompt_scores(s, torch.ones_like(s), kind)[0][0] for name, s in scores.items()}


def centred(steering: Steering, scores: dict[str, torch.Tensor], share: float) -> Steering:
    """The steering with each gate shifted so that `share` of its neutral `scores` lie above
    θ = 0 (the first tenth of a running mean, still settling, left out), and θ = 0."""
    gates = {}
    for name, gate in steering.gates.items():
        seen = scores[name][len(scores[name]) // 10 :]
        gates[name] = replace(gate, bias=gate.bias - torch.quantile(seen, 1 - share))
    return replace(steering, gates=gates).with_gate_settings(threshold=0.0)


def neutral_ids(
    tokenizer: PreTrainedTokenizerBase, options: dict[str, Any], before: bool = False
) -> torch.Tensor:
    """One window of the cost's WikiText after the passages the budget reads: (1, window);
    `before`: the window before it (the budget's last; where gates are centred)."""
    window = options.get("passage_tokens", PERPLEXITY_WINDOW)
    start = (
        options.get("offset", PERPLEXITY_TOKENS)
        + (options.get("passages", CALIBRATION_PASSAGES) - int(before)) * window
    )
    ids = tokens_for_budget(
        tokenizer, load_wikitext(data_source(options.get("data"))), start + window
    )
    if len(ids) < start + window:
        raise ActSteerError("the calibration text is too short for a window of neutral tokens")
    return torch.tensor([ids[start : start + window]])
