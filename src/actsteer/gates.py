"""Gates: a per-token strength from the activations a module's map receives (DSAS-style).

    λ_t = λ · g_t,   g_t = σ((s_t − θ) / τ),   s_t = w · a_t + b

w and b come from a logistic regression per steered module separating the source texts' token
activations (1) from the target texts' (0) at the activation that module's map receives
(class-balanced, L2-regularised on standardised units, `fit_gates`), so s_t is a log-odds that
the token is source-like. θ (threshold) and τ (temperature) belong to the steering
(`GateSettings`), chosen by calibration. What enters the sigmoid depends on the gate's kind:

    token    each token's own score: the strength follows the token
    context  the running mean of the scores of the sequence so far, prompt included (causal):
             the strength follows what the text has been about
    prompt   the mean score of the prompt's real tokens, held for every generated token
             (CAST-style: one decision per request)

A gate is not affine: a gated steering neither folds nor becomes a control vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from actsteer.choices import GATE_KINDS, check_choice
from actsteer.errors import ActSteerError
from actsteer.extras import require

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: Temperatures by kind when none is given: a token's own log-odds as they are, the running
#: mean's (which varies less) sharpened.
DEFAULT_TEMPERATURE = {"token": 1.0, "context": 0.25, "prompt": 0.25}
#: L2 strength of the logistic regression (sklearn's C, on standardised units).
DEFAULT_C = 0.1


@dataclass(frozen=True)
class GateSettings:
    """How a steering's gates turn scores into strengths: kind, threshold θ, temperature τ."""

    kind: str = "context"
    threshold: float = 0.0
    temperature: float | None = None

    def __post_init__(self) -> None:
        check_choice(self.kind, GATE_KINDS, "gate")
        if self.temperature is not None and not self.temperature > 0:
            raise ActSteerError(f"a gate's temperature must be > 0, got {self.temperature}")

    @property
    def tau(self) -> float:
        return DEFAULT_TEMPERATURE[self.kind] if self.temperature is None else self.temperature

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: The settings' names in a steering's info.gate (which also records how the gates were fit).
GATE_FIELDS = ("kind", "threshold", "temperature")


@dataclass
class Gate:
    """One module's gate: the score s = w · a + b of an activation (units last)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def score(self, a: torch.Tensor) -> torch.Tensor:
        """s per token: a (…, D) → (…,), in float32."""
        weight = self.weight.to(a.device)
        return torch.matmul(a.float(), weight) + self.bias.to(a.device)


def folded(gate: Gate, settings: GateSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(w′, b′) with w′ · a + b′ = (s − θ)/τ: the gate's logit in one matrix-vector product
    (g = σ of it)."""
    weight = gate.weight.float() / settings.tau
    return weight, (gate.bias.float() - settings.threshold) / settings.tau


def require_token_gate(name: str, settings: GateSettings | None, carried: str) -> None:
    """Refuse steering `name`'s context or prompt gate where only token gates apply (a batch
    whose rows change between passes); `carried` says what such a gate would carry and why
    this engine cannot."""
    if settings is not None and settings.kind != "token":
        raise ActSteerError(
            f"steering {name!r} has a {settings.kind} gate, which carries each {carried}: use "
            "steering.with_gate_settings(kind='token')"
        )


def open_share(gate: Gate, settings: GateSettings, tokens: torch.Tensor) -> float:
    """The share of token activations (N, D) whose own gate is above one half."""
    g = torch.sigmoid((gate.score(tokens) - settings.threshold) / settings.tau)
    return float((g > 0.5).float().mean())


def fit_gate(source: torch.Tensor, target: torch.Tensor, c: float = DEFAULT_C) -> Gate:
    """A logistic regression of source (1) against target (0) token activations (N, D): units
    standardised on both sets together, classes balanced, L2 strength 1/c; returned in the
    activations' own units (w · a + b)."""
    import numpy as np

    linear_model = require("sklearn.linear_model", "eval", "fitting a gate (a logistic probe)")
    x = torch.cat([source, target]).double()
    mean, spread = x.mean(0), x.std(0).clamp_min(1e-8)
    y = np.r_[np.ones(len(source)), np.zeros(len(target))]
    probe = linear_model.LogisticRegression(
        C=c, class_weight="balanced", solver="newton-cholesky", max_iter=200
    ).fit(((x - mean) / spread).numpy(), y)
    coef = torch.from_numpy(probe.coef_[0]) / spread
    bias = float(probe.intercept_[0]) - float((coef * mean).sum())
    return Gate(coef.float(), torch.tensor(bias, dtype=torch.float32))


def fit_gates(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    source: Sequence[str],
    target: Sequence[str],
    names: Sequence[str],
    *,
    c: float = DEFAULT_C,
    max_length: int = 128,
    batch_size: int = 16,
    budget_mb: float = 1024,
    progress: bool = True,
) -> dict[str, Gate]:
    """One gate per module from the token activations of both sets (pooling "all", subsampled
    within budget_mb like every fit)."""
    from actsteer.capture import record

    recording: dict[str, Any] = dict(
        pooling="all", max_length=max_length, batch_size=batch_size, budget_mb=budget_mb / 2,
        progress=progress,
    )  # fmt: skip
    tokens = {
        what: record(model, tokenizer, texts, names, desc=f"gate: {what}", **recording)
        for what, texts in (("source", source), ("target", target))
    }
    gates = {}
    for name in tqdm(names, desc="fitting gates", disable=not progress, leave=False):
        found = tokens["source"][name], tokens["target"][name]
        if min(len(found[0]), len(found[1])) < 2:
            raise ActSteerError(f"too few tokens at {name!r} to fit a gate; give more texts")
        gates[name] = fit_gate(*found, c=c)
    return gates


def describe_fit(source: int, target: int, c: float) -> dict[str, Any]:
    """What info.gate records of how the gates were fitted."""
    return {"source_texts": source, "target_texts": target, "c": c, "probe": "logistic"}
