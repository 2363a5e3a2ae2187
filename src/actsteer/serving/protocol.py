"""The OpenAI request bodies the server accepts, and their checks beyond types: every problem
is a `RequestError` (an HTTP status and OpenAI's error shape) whose message says what to fix.

Beyond OpenAI's fields a body may carry `steering` (loaded name → λ, null for the artifact's
default strength, or a budget {"max_delta_ppl": x} / {"max_kl": x} read off the artifact's
calibration curve, actsteer.budgets; several compose in the given order), `support`, and
`actsteer`: `gate` (steering name → false switches that steering's gate off for the request)
and `telemetry` (true: the response carries, per generated token, each gated steering's mean
gate). Responses to a steered request carry `actsteer.strengths`: the λ each steering ran at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from actsteer.budgets import strength_for_budget
from actsteer.choices import SUPPORTS, check_choice
from actsteer.errors import ActSteerError
from actsteer.guards import check_far_strength, reach
from actsteer.methods import get_method
from actsteer.steering import Steering


class RequestError(Exception):
    """An error answered to the client: status, message, OpenAI error type and param."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 404: "invalid_request_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )

    def body(self) -> dict[str, Any]:
        code = {401: "invalid_api_key", 404: "model_not_found", 503: "server_overloaded"}
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": code.get(self.status),
            }
        }


class StreamOptions(BaseModel):
    include_usage: bool = False


class ActsteerOptions(BaseModel):
    """The request's `actsteer` field: gates switched per steering, and gate telemetry."""

    model_config = ConfigDict(extra="forbid", strict=True)

    gate: dict[str, bool] = Field(default_factory=dict)
    telemetry: bool = False


class Common(BaseModel):
    """The fields completions and chat share."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    steering: dict[str, float | None | dict[str, float]] | None = None
    support: str | None = None
    actsteer: ActsteerOptions | None = None
    # accepted at their defaults only
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None


class CompletionBody(Common):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatBody(Common):
    messages: list[Message]
    max_completion_tokens: int | None = None


#: Fields accepted only at their defaults (unset, 0, false or empty).
UNSUPPORTED = ("frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "echo", "suffix")


@dataclass(frozen=True)
class Limits:
    """What the server allows: the model's context, the most tokens one request may ask."""

    context: int
    max_tokens: int


def check_common(body: Common) -> None:
    """Refuse what the server does not do (n > 1, penalties, logprobs, …)."""
    if body.n != 1:
        raise RequestError(f"n={body.n} is not supported; ask for one choice (n=1)", param="n")
    best_of = getattr(body, "best_of", None)
    if best_of not in (None, 1):
        raise RequestError("best_of is not supported; leave it out", param="best_of")
    for name in UNSUPPORTED:
        if getattr(body, name, None):
            raise RequestError(f"{name} is not supported by this server; leave it out", param=name)


def stop_strings(body: Common) -> list[str]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise RequestError(f"give at most 4 stop sequences, got {len(stop)}", param="stop")
    return stop


def token_budget(body: Common, requested: int | None, prompt_tokens: int, limits: Limits) -> int:
    """max_tokens, checked: ≥ 1, ≤ the server's limit, prompt + it within the context."""
    if prompt_tokens >= limits.context:
        raise RequestError(
            f"the prompt has {prompt_tokens} tokens but the model's context is {limits.context}; "
            "shorten the prompt",
            param="prompt" if isinstance(body, CompletionBody) else "messages",
        )
    room = limits.context - prompt_tokens
    if requested is None:
        return min(16 if isinstance(body, CompletionBody) else limits.max_tokens, room)
    if requested <= 0:
        raise RequestError(f"max_tokens must be ≥ 1, got {requested}", param="max_tokens")
    if requested > limits.max_tokens:
        raise RequestError(
            f"max_tokens={requested} is over this server's limit of {limits.max_tokens}",
            param="max_tokens",
        )
    if requested > room:
        raise RequestError(
            f"the prompt has {prompt_tokens} tokens and max_tokens is {requested}, more than the "
            f"model's context of {limits.context}; ask for at most {room} tokens",
            param="max_tokens",
        )
    return requested


def resolve_steering(
    body: Common, steerings: dict[str, Steering]
) -> list[tuple[str, str, float, bool]]:
    """The request's steerings as (name, support, λ, gated) in the given order, each checked: a
    loaded name, a λ in its method's range (null: its default strength), a support it has, a
    gate switch only for a steering of the request that has a gate."""
    try:
        check_choice(body.support, SUPPORTS, "support")
    except ActSteerError as error:
        raise RequestError(str(error), param="support") from None
    if body.support is not None and not body.steering:
        raise RequestError("a support needs a steering; add the field steering", param="support")
    resolved = []
    for name, strength in (body.steering or {}).items():
        steering = steerings.get(name)
        if steering is None:
            loaded = ", ".join(steerings) or "none"
            raise RequestError(
                f"unknown steering {name!r}; loaded steerings: {loaded}", param="steering"
            )
        if isinstance(strength, dict):
            try:
                lam = strength_for_budget(name, steering, strength)
            except ActSteerError as err:
                raise RequestError(str(err), param="steering") from None
        else:
            lam = steering.info.default_strength if strength is None else float(strength)
        support = body.support or steering.default_support
        span = get_method(steering.method).strength_range
        if span is not None and math.isfinite(lam):
            lo, hi = span[0], max(span[1], steering.extrapolated_to or span[1])
            if not lo <= lam <= hi:
                raised = " (raised to its calibrated strength)" if hi > span[1] else ""
                raise RequestError(
                    f"steering {name!r}: strength {lam:g} is outside [{lo:g}, {hi:g}], the range "
                    f"this server steers with it: {steering.method}'s{raised}; pick λ in it",
                    param="steering",
                )
        try:
            steering.check_strength(lam)
            check_far_strength(reach(steering.maps), torch.tensor(lam), steering.extrapolated_to)
            for amap in steering.maps.values():
                amap.support(support)
        except ActSteerError as err:
            raise RequestError(f"steering {name!r}: {err}", param="steering") from None
        switches = body.actsteer.gate if body.actsteer is not None else {}
        resolved.append((name, support, lam, bool(steering.gates) and switches.get(name, True)))
    for name in body.actsteer.gate if body.actsteer is not None else {}:
        if name not in (body.steering or {}) or not steerings[name].gates:
            raise RequestError(
                f"actsteer.gate names {name!r}, which is not a gated steering of this request "
                "(switch the gate of a steering the request uses and that has one)",
                param="actsteer",
            )
    return resolved
