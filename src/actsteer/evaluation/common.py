"""What every task shares: resolving strengths (actsteer.strengths), steering a block of code,
the result contract."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from actsteer.steering import Steering
from actsteer.strengths import resolve_strengths as resolve_strengths  # the tasks' import


class TaskResult(Protocol):
    """What a task returns: the numbers, the strength used, and the settings that produced them.

    METRICS maps each metric name to a human label (used for plot axes); `metrics()` gives
    their values and `intervals()` the 95% intervals of those that have one.
    """

    TASK: ClassVar[str]
    METRICS: ClassVar[dict[str, str]]
    strength: float
    settings: dict[str, Any]

    def metrics(self) -> dict[str, float]: ...

    def intervals(self) -> dict[str, tuple[float, float]]: ...


@contextmanager
def steering_applied(
    model: nn.Module,
    steering: Steering | None,
    strength: float | torch.Tensor,
    support: str | None = None,
) -> Iterator[None]:
    """Run the block on the steered model (or the plain one when steering is None)."""
    context = nullcontext() if steering is None else steering.applied(model, strength, support)
    with context:
        yield


def describe_steering(steering: Steering | None) -> dict[str, Any] | None:
    """A small JSON-able description of a steering for result settings."""
    if steering is None:
        return None
    info = steering.info.to_json()
    keys = ("method", "mode", "pooling", "support", "inverted", "data")
    return {
        "modules": len(steering.maps),
        **{k: info[k] for k in keys if k in info},
    }


def jsonable(value: Any) -> Any:
    """Dataclasses, numpy scalars/arrays, tuples and paths turned into plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray | torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
