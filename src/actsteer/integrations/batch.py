"""Per-request steering of a batch flattened into one token axis, as vLLM runs it.

A request names the steerings it wants, each with a strength, in order
(`{"detox": 0.8, "football": 0.5}`, or the string `"detox=0.8,football=0.5"` that vLLM's
OpenAI server can carry). A batch of such requests becomes *stages*: (steering, one λ per
request), applied in order, so each request sees its own steerings in its own order and a
request that asks for none has λ = 0 everywhere. A budget may stand for a strength
(`{"detox": {"max_delta_ppl": 1.0}}`): λ is read off the artifact's calibration curve
(actsteer.budgets), the same for every request that gives it, so `parse_request` tells a client
the λ its request runs at (vLLM's responses have no field for it). Once per forward pass the
stages are spread over the tokens by the engine's request boundaries (`query_start_loc`). Knows
no engine: `actsteer.integrations.vllm` feeds it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from actsteer.budgets import strength_for_budget
from actsteer.errors import ActSteerError
from actsteer.hub import locate
from actsteer.steering import Steering

#: The key of SamplingParams.extra_args (and of vLLM's `vllm_xargs`) that carries a request's
#: steerings.
ARG_KEY = "actsteer"
#: The environment variable naming the steerings an engine serves: `name=path[,name=path]`.
ENV = "ACTSTEER_VLLM_STEERINGS"

#: One request's steerings in order: (name, λ) pairs.
Spec = tuple[tuple[str, float], ...]
#: A batch's steerings in order: (name, one λ per request or per token).
Stages = list[tuple[str, torch.Tensor]]


def parse_table(text: str) -> dict[str, Path]:
    """`name=path[,name=path]` → {name: path}, in order."""
    table: dict[str, Path] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, path = entry.partition("=")
        name = name.strip()
        if not sep or not name or not path.strip():
            raise ActSteerError(
                f"{ENV} entry {entry!r} is not name=path; write e.g. "
                f"{ENV}=detox=/models/detox.safetensors,football=football.safetensors"
            )
        if name in table:
            raise ActSteerError(f"{ENV} names steering {name!r} twice; give each one name")
        table[name] = Path(path.strip())
    return table


def load_table(text: str) -> dict[str, Steering]:
    """The steerings an engine serves, loaded from the files `text` (see ENV) names."""
    steerings = {}
    for name, path in parse_table(text).items():
        try:
            file = locate(path)  # a file, a save_pretrained folder or hf:USER/REPO
        except ActSteerError as err:
            raise ActSteerError(f"steering {name!r} (set in {ENV}): {err}") from None
        if not file.is_file():
            raise ActSteerError(f"steering {name!r}: no file {str(path)!r} (set in {ENV})")
        steerings[name] = Steering.load(file)
    return steerings


def _strength(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ActSteerError(f"the strength of steering {name!r} must be a number, got {value!r}")
    try:
        strength = float(value)
    except ValueError:
        raise ActSteerError(
            f"the strength of steering {name!r} must be a number, got {value!r}"
        ) from None
    if not math.isfinite(strength):
        raise ActSteerError(f"the strength of steering {name!r} must be finite, got {value!r}")
    return strength


def parse_request(value: object, steerings: Mapping[str, Steering]) -> Spec:
    """A request's `extra_args["actsteer"]` → its (name, λ) pairs, each checked: the name is
    served and λ within its method's range. A name without `=λ` in the string form takes the
    steering's default strength; a budget in the object form, the λ of actsteer.budgets."""
    pairs: list[tuple[object, object]] = []
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, str):
        for entry in filter(None, (part.strip() for part in value.split(","))):
            left, sep, right = entry.partition("=")
            pairs.append((left.strip(), right.strip() if sep else None))
    else:
        raise ActSteerError(
            f'extra_args["{ARG_KEY}"] must be an object {{"name": strength}} or a string '
            f"'name=strength,name=strength', got {type(value).__name__}"
        )
    spec: list[tuple[str, float]] = []
    for key, number in pairs:
        if not isinstance(key, str) or key not in steerings:
            served = ", ".join(steerings) or f"none (set {ENV} before starting vLLM)"
            raise ActSteerError(f"unknown steering {key!r}; this engine serves: {served}")
        name = key
        if any(name == seen for seen, _ in spec):
            raise ActSteerError(f"steering {name!r} is asked for twice in one request")
        steering = steerings[name]
        if isinstance(number, Mapping):
            strength = strength_for_budget(name, steering, number)
        else:
            strength = steering.info.default_strength if number is None else _strength(name, number)
        try:
            steering.check_strength(strength)
        except ActSteerError as err:
            raise ActSteerError(f"steering {name!r}: {err}") from None
        spec.append((name, strength))
    return tuple(spec)


def cache_salt(spec: Spec) -> str | None:
    """The prefix-cache salt of a request's steerings: one per distinct (name, λ) sequence
    (λ = 0 left out: it is the plain model), None for an unsteered request, which shares the
    cache with every other unsteered one. vLLM hashes it into the request's first KV block, so a
    prefix computed under one steering is never reused under another."""
    steered = [(name, float(strength)) for name, strength in spec if strength != 0.0]
    if not steered:
        return None
    digest = hashlib.sha256(json.dumps(steered).encode()).hexdigest()[:32]
    return f"{ARG_KEY}:{digest}"


def build_stages(requests: Mapping[int, Spec], size: int) -> Stages:
    """The stages of a batch of `size` requests (index → spec; absent: no steering).

    Stage order follows each request's own order: all first steerings, then all second ones;
    within one rank, different steerings act on different requests, so their order is free.
    Stages whose λ is zero for every request are dropped.
    """
    ranked: dict[tuple[int, str], torch.Tensor] = {}
    for index, spec in requests.items():
        for rank, (name, strength) in enumerate(spec):
            if strength != 0.0 and index < size:
                lam = ranked.setdefault((rank, name), torch.zeros(size))
                lam[index] = strength
    return [(name, lam) for (_, name), lam in sorted(ranked.items(), key=lambda kv: kv[0][0])]


def request_slots(
    requests: Mapping[int, Spec], size: int, ids: Mapping[str, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(steering id, λ) of each request's k-th steering, for a compiled graph's slots
    (actsteer.integrations.slots): two (len(ids), size) tensors, id 0 and λ 0 where a request
    has fewer steerings, λ = 0 ones left out like `build_stages` does."""
    steering = torch.zeros(len(ids), size, dtype=torch.long)
    strength = torch.zeros(len(ids), size)
    for index, spec in requests.items():
        if index < size:
            for slot, (name, lam) in enumerate(s for s in spec if s[1] != 0.0):
                steering[slot, index], strength[slot, index] = ids[name], lam
    return steering, strength


def token_strengths(
    per_request: torch.Tensor, query_start_loc: torch.Tensor, tokens: int
) -> torch.Tensor:
    """λ per token of a flattened batch: request r owns tokens query_start_loc[r] to
    query_start_loc[r + 1]; tokens after the last request (padding) get λ = 0."""
    device = query_start_loc.device
    ends = query_start_loc[1 : per_request.shape[0] + 1].to(torch.long)
    owner = torch.searchsorted(ends, torch.arange(tokens, device=device), right=True)
    padded = torch.cat([per_request, per_request.new_zeros(1)]).to(device)
    return padded[owner]


class BatchSteering:
    """The steerings of the engine's running batch: per-request specs kept in batch order by
    the engine's updates, and per forward pass the stages spread over the tokens once.

    steerings: name → Steering, the table the engine serves.
    """

    def __init__(self, steerings: Mapping[str, Steering]) -> None:
        self.steerings = dict(steerings)
        #: each steering's id in a compiled graph's tables (0: none)
        self.ids = {name: number for number, name in enumerate(self.steerings, start=1)}
        self.requests: dict[int, Spec] = {}
        self.stages: Stages = []
        self.slots = request_slots({}, 0, self.ids)
        self._boundaries: torch.Tensor | None = None
        self._tokens: Stages | None = None

    def set_batch(self, size: int) -> None:
        """Rebuild the stages (and the per-request slots) after `requests` changed; the batch
        holds `size` requests."""
        self.stages = build_stages(self.requests, size)
        self.slots = request_slots(self.requests, size, self.ids)

    def begin_pass(self, query_start_loc: torch.Tensor | None) -> None:
        """A forward pass starts with these request boundaries (None: no requests, e.g. the
        engine's warm-up run; nothing is steered)."""
        self._boundaries = query_start_loc
        self._tokens = None

    def token_stages(self, tokens: int) -> Stages:
        """The stages of this pass with one λ per token, built on the first call of the pass."""
        if self._tokens is None or self._tokens[0][1].shape[0] != tokens:
            boundaries = self._boundaries
            if boundaries is None or not self.stages:
                return []
            self._tokens = [
                (name, token_strengths(lam, boundaries, tokens)) for name, lam in self.stages
            ]
        return self._tokens
