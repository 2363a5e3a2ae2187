"""Calibration: the largest strength λ whose cost in quality stays within a budget.

`calibrate(steering, model, tok, budget=1.0)` answers "which strength?" with the paper's rule,
ΔPPL ≤ +1 on held-out text, or with a KL budget on neutral prompts (cost="kl"):

- cost "ppl": PPL(steered at λ) − PPL(plain), teacher-forced on `passages` blocked windows of
  `passage_tokens` tokens of WikiText-2 test (default 8 × 512: the perplexity task's window, as
  perplexity, and so ΔPPL, depends on the window length), starting `offset` tokens in. The
  default offset skips the first 4096 tokens, which `actsteer eval perplexity` reads by
  default, so the λ is chosen on text that evaluation does not score. The text follows the
  evaluation data rules (`data`, else wikitext/wiki.test.raw under $ACTSTEER_DATA, else the
  hub).
- cost "kl": the mean over token positions of KL(plain ‖ steered) of the next-token
  distributions (nats) on neutral prompts: `prompts`, else the last 32 sentences of the
  package's own data/neutral.txt.

The plain model's side is computed once. The search takes λ = 0 as cost 0 (the untouched
model, by the λ formula) and assumes the cost grows with λ: a bounded method (range [0, hi])
tries hi first and bisects [0, hi] when hi is over budget; an unbounded one (ActAdd, ITI-c)
doubles λ from `start` until a cost exceeds the budget or λ reaches `cap`, then bisects. Bisection
stops when the λ within budget and the λ over it are at most `tolerance` apart (default: 1/64
of the smallest λ found over budget): with the defaults, 8 evaluations of the cost for a
bounded range (the plain model, the top, 6 halvings), at most 16 for an unbounded one.

Nothing else is read: no evaluation prompts, no task data beyond the text named above.

`calibrate_modules(model, tok, source, target, ["post-attn-ln", "mlp-out"], budget)` does the
same for several module choices: it fits one steering per choice, calibrates each to the
budget, and keeps the one whose effect on held-out texts (how much likelier target lines
become than source lines, `likelihood_gap`) is largest at its calibrated λ, i.e. at matched
cost.

This is a function, not a `Steering` method, because it needs the evaluation code
(actsteer.evaluation), which sits above `steering.py`: a method would be an import circle.
"""

from __future__ import annotations

import importlib.resources
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from actsteer.choices import CALIBRATION_CAP, CALIBRATION_PASSAGES, check_choice
from actsteer.errors import ActSteerError
from actsteer.evaluation.likelihood import (
    batched_logits,
    continuation_logprobs,
    encode,
    special_prefix,
)
from actsteer.evaluation.tasks.perplexity import (
    MAX_TOKENS,
    WINDOW,
    data_source,
    load_wikitext,
    token_nll,
    tokens_for_budget,
)
from actsteer.fitting import fit
from actsteer.methods import get_method
from actsteer.steering import Steering

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

COSTS = ("ppl", "kl")
COST_LABELS = {"ppl": "ΔPPL", "kl": "KL"}
#: Defaults: 8 passages of 512 tokens (the perplexity task's window, so ΔPPL is on the scale
#: `actsteer eval perplexity` reports) after the task's default slice of 4096 tokens.
PASSAGES = CALIBRATION_PASSAGES
PASSAGE_TOKENS = WINDOW
OFFSET = MAX_TOKENS
#: Defaults of the KL cost: the last 32 of the package's neutral sentences.
NEUTRAL_FILE = "neutral.txt"
NEUTRAL_PROMPTS = 32
#: Unbounded methods: doubling starts at START and stops at CAP.
START = 1.0
CAP = CALIBRATION_CAP
#: Default tolerance, as a fraction of the smallest λ found over budget.
RELATIVE_TOLERANCE = 1 / 64


@dataclass
class CalibrationPoint:
    """One evaluated strength: its cost and whether that is within the budget."""

    strength: float
    cost: float
    within: bool


@dataclass
class CalibrationResult:
    """The outcome of `calibrate`.

    steering: the input steering with info.default_strength = strength (and info.support =
      the support calibrated under, info.calibration = this summary), ready to save.
    strength: the chosen λ, the largest found within budget; cost: its cost.
    rejected: the smallest λ found over budget (None: the whole range, or up to cap, is within).
    stopped_by: "tolerance" (bisection converged), "range" (the top of the range is within
      budget), "cap" (an unbounded method stayed within budget up to cap) or "zero budget"
      (nothing evaluated: only λ = 0 costs nothing).
    reference: the plain model's perplexity (cost "ppl"), or 0.0 (cost "kl").
    curve: every evaluated (λ, cost), sorted by λ, starting with λ = 0 (cost 0, not run).
    evaluations, forward_passes, seconds: what the search cost, plain model included.
    """

    steering: Steering
    strength: float
    cost: float
    budget: float
    cost_name: str
    rejected: float | None
    stopped_by: str
    reference: float
    curve: list[CalibrationPoint]
    evaluations: int
    forward_passes: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return COST_LABELS[self.cost_name]

    def summary(self) -> dict[str, Any]:
        """What the artifact keeps (SteeringInfo.calibration): JSON values only."""
        return {
            "cost": self.cost_name,
            "budget": self.budget,
            "strength": self.strength,
            "at_strength": _finite(self.cost),
            "rejected": self.rejected,
            "stopped_by": self.stopped_by,
            "reference": self.reference,
            "curve": [[p.strength, _finite(p.cost)] for p in self.curve],
            **self.settings,
        }

    def to_json(self) -> dict[str, Any]:
        """The whole result as JSON values (the steering described by its calibration)."""
        entries = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "steering"}
        entries["curve"] = [asdict(p) for p in self.curve]
        return entries


def _finite(value: float) -> float | None:
    """A JSON-safe cost: None for NaN or infinity."""
    return value if math.isfinite(value) else None


def package_prompts(name: str = NEUTRAL_FILE, last: int = NEUTRAL_PROMPTS) -> list[str]:
    """The last `last` sentences of one of the package's data files (src/actsteer/data/)."""
    text = importlib.resources.files("actsteer").joinpath("data", name).read_text("utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-last:]


# ---------------------------------------------------------------------------------------------
# the search, on any cost function of λ


def search_strength(
    cost: Callable[[float], float],
    budget: float,
    upper: float | None,
    *,
    start: float = START,
    cap: float = CAP,
    tolerance: float | None = None,
) -> tuple[float, float | None, str, dict[float, float]]:
    """The largest λ in [0, upper] (upper None: [0, cap]) with cost(λ) ≤ budget, by bisection.

    cost(0) is taken as 0 without calling it. Returns (λ within budget, the smallest λ found
    over it or None, why the search stopped, every evaluated {λ: cost}). A NaN cost is over
    budget.
    """
    if upper is not None and not (math.isfinite(upper) and upper > 0):
        raise ActSteerError(f"the range's upper end must be a finite λ > 0, got {upper}")
    if upper is None and not (math.isfinite(start) and math.isfinite(cap) and 0 < start <= cap):
        raise ActSteerError(f"need finite 0 < start ≤ cap, got start {start}, cap {cap}")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise ActSteerError(f"tolerance must be a finite number > 0, got {tolerance}")
    points: dict[float, float] = {0.0: 0.0}

    def within(strength: float) -> bool:
        points[strength] = value = float(cost(strength))
        return value <= budget  # False for NaN

    accepted, rejected = 0.0, None
    if upper is not None:
        if within(upper):
            return upper, None, "range", points
        rejected = upper
    else:
        strength = start
        while rejected is None:
            if not within(strength):
                rejected = strength
            elif strength >= cap:
                return strength, None, "cap", points
            else:
                accepted, strength = strength, min(2 * strength, cap)
    tolerance = tolerance if tolerance is not None else rejected * RELATIVE_TOLERANCE
    while rejected - accepted > tolerance:
        middle = (accepted + rejected) / 2
        if within(middle):
            accepted = middle
        else:
            rejected = middle
    return accepted, rejected, "tolerance", points


# ---------------------------------------------------------------------------------------------
# the two costs: the plain side once, then one evaluation per λ


class _PerplexityCost:
    """λ ↦ PPL(steered at λ) − PPL(plain) on fixed windows of token ids."""

    def __init__(self, run: Callable[[], tuple[float, int]]) -> None:
        self.run = run
        total, count = run()
        self.reference = math.exp(total / count)

    def value(self) -> float:
        total, count = self.run()
        return math.exp(total / count) - self.reference


class _KLCost:
    """λ ↦ mean over positions of KL(plain ‖ steered) of next-token distributions."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        batch_size: int,
    ) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.prefix = special_prefix(tokenizer)
        self.rows = [encode(tokenizer, text) for text in prompts]
        if any(not row for row in self.rows):
            raise ActSteerError("every KL prompt needs at least one token")
        self.plain = dict(self._logprobs())  # row → (L, V) log-probabilities of the plain model
        self.positions = sum(len(row) for row in self.rows)
        self.reference = 0.0

    def _logprobs(self) -> Any:
        for batch, logits, _ in batched_logits(
            self.model, self.tokenizer, self.prefix, self.rows, batch_size=self.batch_size
        ):
            for b, i in enumerate(batch):
                yield i, logits[b, : len(self.rows[i])].log_softmax(-1)

    def value(self) -> float:
        total = 0.0
        for i, steered in self._logprobs():
            plain = self.plain[i]
            total += float((plain.exp() * (plain - steered)).sum())
        return total / self.positions


# ---------------------------------------------------------------------------------------------
# calibrate


def check_budget(budget: float, cost: str) -> None:
    """A clear error for a cost other than COSTS or a budget that is negative or not finite."""
    check_choice(cost, COSTS, "cost")
    if not (isinstance(budget, int | float) and math.isfinite(budget) and budget >= 0):
        raise ActSteerError(f"the budget must be a finite number ≥ 0, got {budget}")


def strength_upper(steering: Steering) -> float | None:
    """The top of the λ range searched: the method's (raised by `extrapolated`), None if none."""
    span = get_method(steering.method).strength_range
    if span is None:
        return None
    lo, hi = span
    if lo > 0:
        raise ActSteerError(
            f"method {steering.method!r} has λ range [{lo:g}, {hi:g}], without the untouched "
            "model (λ = 0) to start the search from"
        )
    return max(hi, steering.max_strength) if steering.max_strength is not None else hi


def calibrate(
    steering: Steering,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    budget: float = 1.0,
    *,
    cost: str = "ppl",
    data: str | Path | None = None,
    passages: int = PASSAGES,
    passage_tokens: int = PASSAGE_TOKENS,
    offset: int = OFFSET,
    prompts: Sequence[str] | None = None,
    support: str | None = None,
    tolerance: float | None = None,
    start: float = START,
    cap: float = CAP,
    batch_size: int = 8,
    on_point: Callable[[float, float], None] | None = None,
) -> CalibrationResult:
    """The largest λ of the steering's range whose cost stays within `budget` (see the module).

    cost "ppl" (budget in perplexity points, the paper's +1) reads `data` (a raw text file or
    "hf:ID[:CONFIG[:SPLIT]]"; default WikiText-2 test) from token `offset` on; cost "kl" (budget
    in nats) reads `prompts`. support: the support to steer with (default: the steering's).
    on_point(λ, cost) is called after each evaluation. Returns a CalibrationResult whose
    `.steering` is the steering with the chosen λ as its default strength:

        result = actsteer.calibrate(steering, model, tok, budget=1.0)
        result.steering.save("calibrated.safetensors")
    """
    check_budget(budget, cost)
    if cost == "ppl" and prompts is not None:
        raise ActSteerError("prompts are the KL cost's text; the perplexity cost reads data")
    if cost == "kl" and data is not None:
        raise ActSteerError("data is the perplexity cost's text; the KL cost reads prompts")
    if batch_size < 1:
        raise ActSteerError(f"batch_size must be at least 1, got {batch_size}")
    upper = strength_upper(steering)
    support = support or steering.default_support
    steering.check_compatible(model)
    started, passes = time.perf_counter(), [0]
    counter = model.register_forward_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    try:
        settings, measure = _cost_function(
            cost, model, tokenizer, data, passages, passage_tokens, offset, prompts, batch_size
        )

        def cost_at(strength: float) -> float:
            with steering.applied(model, strength, support):
                value = measure.value()
            if on_point is not None:
                on_point(strength, value)
            return value

        rejected: float | None
        if budget == 0:  # answered at once: only λ = 0 costs nothing
            strength, rejected, stopped_by, points = 0.0, 0.0, "zero budget", {0.0: 0.0}
        else:
            strength, rejected, stopped_by, points = search_strength(
                cost_at, budget, upper, start=start, cap=cap, tolerance=tolerance
            )
    finally:
        counter.remove()
    curve = [CalibrationPoint(s, c, c <= budget) for s, c in sorted(points.items())]
    result = CalibrationResult(
        steering=steering,
        strength=strength,
        cost=points[strength],
        budget=float(budget),
        cost_name=cost,
        rejected=rejected,
        stopped_by=stopped_by,
        reference=measure.reference,
        curve=curve,
        evaluations=len(points),  # the λ > 0 evaluated, plus the plain model
        forward_passes=passes[0],
        seconds=time.perf_counter() - started,
        settings={**settings, "support": support, "tolerance": tolerance},
    )
    info = replace(
        steering.info, default_strength=strength, support=support, calibration=result.summary()
    )
    result.steering = replace(steering, info=info)
    return result


def _cost_function(
    cost: str,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: str | Path | None,
    passages: int,
    passage_tokens: int,
    offset: int,
    prompts: Sequence[str] | None,
    batch_size: int,
) -> tuple[dict[str, Any], _PerplexityCost | _KLCost]:
    """The settings recorded and the cost to measure (its plain side already computed)."""
    if cost == "kl":
        texts = package_prompts() if prompts is None else [p for p in prompts if p.strip()]
        if not texts:
            raise ActSteerError("give at least one non-blank prompt for the KL cost")
        where = f"actsteer/data/{NEUTRAL_FILE} (last {len(texts)})" if prompts is None else None
        settings = {"prompts": where or f"{len(texts)} given prompts", "n_prompts": len(texts)}
        return settings, _KLCost(model, tokenizer, texts, batch_size)
    if passages < 1 or passage_tokens < 2 or offset < 0:
        raise ActSteerError(
            f"need passages ≥ 1, passage_tokens ≥ 2 and offset ≥ 0, got {passages}, "
            f"{passage_tokens}, {offset}"
        )
    source = data_source(data)
    wanted = offset + passages * passage_tokens
    ids = tokens_for_budget(tokenizer, load_wikitext(source), wanted)
    if len(ids) < wanted:
        raise ActSteerError(
            f"the perplexity text ({source}) has {len(ids)} tokens, fewer than the {wanted} "
            f"asked for (offset {offset} + {passages} passages × {passage_tokens}); lower them"
        )
    ids = ids[offset:]

    def run() -> tuple[float, int]:
        return token_nll(model, tokenizer, ids, window=passage_tokens, batch_size=batch_size)

    settings = {
        "data": str(source),
        "offset": offset,
        "passages": passages,
        "passage_tokens": passage_tokens,
    }
    return settings, _PerplexityCost(run)


# ---------------------------------------------------------------------------------------------
# choosing the modules: candidates calibrated to one budget, compared by a held-out effect


@dataclass
class ModulesCandidate:
    """One module choice, fitted and calibrated; effect: its held-out effect at that λ."""

    modules: str
    calibration: CalibrationResult
    effect: float


@dataclass
class ModulesCalibration:
    """The outcome of `calibrate_modules`: every candidate (in the given order), the best one
    (largest effect at matched cost) and the held-out texts' description."""

    candidates: list[ModulesCandidate]
    best: ModulesCandidate
    held_out: dict[str, Any]

    @property
    def steering(self) -> Steering:
        """The best candidate's steering, with its calibrated default strength."""
        return self.best.calibration.steering


def likelihood_gap(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    source: Sequence[str],
    target: Sequence[str],
    batch_size: int = 8,
) -> float:
    """Mean NLL per token of the source texts minus that of the target texts (nats): it grows
    as a steering makes target-like text likelier than source-like text. Run it inside the
    steering context to measure the steered model. Without a BOS token, a text's first word is
    context, not scored."""

    def nll(texts: Sequence[str]) -> float:
        scored = text_losses(model, tokenizer, texts, batch_size)
        tokens = sum(n for _, n in scored)
        if not tokens:
            raise ActSteerError("the held-out texts need at least one with two words or more")
        return sum(loss for loss, _ in scored) / tokens

    return nll(source) - nll(target)


def text_losses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 8,
) -> list[tuple[float, int]]:
    """(summed NLL in nats, tokens scored) of each text, in order, as `likelihood_gap` scores
    them: without a BOS token the first word is context; a one-word text scores (0.0, 0)."""
    prefix = bool(special_prefix(tokenizer))
    requests, scored_at = [], []
    for index, text in enumerate(texts):
        head, space, tail = text.strip().partition(" ")
        if prefix or tail:
            requests.append(("", text.strip()) if prefix else (head, space + tail))
            scored_at.append(index)
    losses = [(0.0, 0)] * len(texts)
    if requests:
        scored = continuation_logprobs(model, tokenizer, requests, batch_size=batch_size)
        for index, (logprob, tokens) in zip(scored_at, scored, strict=True):
            losses[index] = (-logprob, tokens)
    return losses


def calibrate_modules(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    source: Sequence[str],
    target: Sequence[str],
    candidates: Sequence[str],
    budget: float = 1.0,
    *,
    held_out: tuple[Sequence[str], Sequence[str]] | None = None,
    fit_options: dict[str, Any] | None = None,
    on_candidate: Callable[[ModulesCandidate], None] | None = None,
    **options: Any,
) -> ModulesCalibration:
    """Fit one steering per module choice (a preset or regex), calibrate each to the same
    budget, and pick the one whose held-out effect is largest at its calibrated λ.

    The effect is the change, from the plain model to the steered one, of `likelihood_gap` on
    held-out source and target texts: `held_out`, else the last quarter of each set (at least
    two texts), which are then left out of the fits. fit_options go to `actsteer.fit` (method,
    mode, pooling, support, max_length, …); options to `calibrate` (cost, data, prompts, …).
    """
    if not candidates:
        raise ActSteerError("give at least one module candidate")
    check_budget(budget, options.get("cost", "ppl"))
    source, target = list(source), list(target)
    if held_out is None:
        cut_source, cut_target = max(2, len(source) // 4), max(2, len(target) // 4)
        if len(source) - cut_source < 2 or len(target) - cut_target < 2:
            raise ActSteerError(
                "too few texts to hold a quarter out for the effect: give at least 4 source "
                "and 4 target texts, or the held-out texts"
            )
        held_source, source = source[-cut_source:], source[:-cut_source]
        held_target, target = target[-cut_target:], target[:-cut_target]
        where = "the last quarter of each set"
    else:
        held_source, held_target = list(held_out[0]), list(held_out[1])
        where = "given"
    batch_size = options.get("batch_size", 8)
    plain_gap = likelihood_gap(model, tokenizer, held_source, held_target, batch_size)
    fit_options = {"progress": False, **(fit_options or {})}
    results = []
    for modules in dict.fromkeys(candidates):
        steering = fit(model, tokenizer, source=source, target=target, modules=modules,
                       **fit_options)  # fmt: skip
        calibration = calibrate(steering, model, tokenizer, budget, **options)
        chosen = calibration.steering
        with chosen.applied(model, calibration.strength, chosen.info.support):
            gap = likelihood_gap(model, tokenizer, held_source, held_target, batch_size)
        candidate = ModulesCandidate(modules, calibration, gap - plain_gap)
        results.append(candidate)
        if on_candidate is not None:
            on_candidate(candidate)
    best = max(results, key=lambda c: c.effect)
    held = {"where": where, "source": len(held_source), "target": len(held_target)}
    return ModulesCalibration(results, best, {**held, "plain_gap": plain_gap})
