"""Steering: the fitted maps of named modules, and attaching them to a model with a strength λ.

The hot path is a forward hook per module that computes ω̃ ⊙ a + λβ (inside the support) from
tensors prepared once per strength on the module's device and dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from actsteer.errors import ActSteerError
from actsteer.maps import SUPPORTS, AffineMap
from actsteer.methods import get_method

Strength = float | torch.Tensor


@dataclass
class Steering:
    """Per-module affine maps plus what is needed to apply, check and describe them.

    info holds the description that travels with an artifact: method, model name and
    fingerprint, pooling, mode, data description, default strength and support.
    """

    maps: dict[str, AffineMap]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.info.get("method", "linear-act")

    @property
    def modules(self) -> list[str]:
        return list(self.maps)

    @property
    def default_support(self) -> str:
        return self.info.get("support", get_method(self.method).default_support)

    def check_strength(self, strength: Strength) -> None:
        """Raise a clear error for a λ outside the method's range."""
        get_method(self.method).check_strength(strength)

    def attach(
        self, model: nn.Module, strength: Strength = 1.0, support: str | None = None
    ) -> SteeringHandle:
        """Register the hooks; the handle sets the strength and removes them."""
        return SteeringHandle(self, model, strength, support or self.default_support)

    @contextmanager
    def applied(
        self, model: nn.Module, strength: Strength = 1.0, support: str | None = None
    ) -> Iterator[SteeringHandle]:
        """Steer `model` inside the block; hooks are removed on exit, even on error.

        strength: λ as a number, or a (batch,) tensor giving each batch row its own λ.
        support: "q0-100" (default for mitigation), "q1-99", "q5-95" or "all" (induction).
        """
        handle = self.attach(model, strength, support)
        try:
            yield handle
        finally:
            handle.remove()

    def inverse(self) -> Steering:
        """The inverse maps: a steering that removes a concept becomes one that adds it."""
        info = {**self.info, "inverted": not self.info.get("inverted", False)}
        return Steering({name: m.inverse() for name, m in self.maps.items()}, info)

    def save(self, path: str | Path) -> Path:
        """Write the steering to one .safetensors file (tensors + JSON metadata)."""
        from actsteer.artifact import save_steering

        return save_steering(self, path)

    @classmethod
    def load(cls, path: str | Path) -> Steering:
        """Read a steering saved with `save`; a damaged or foreign file is a clear error."""
        from actsteer.artifact import load_steering

        return load_steering(path)

    def with_info(self, **updates: Any) -> Steering:
        return replace(self, info={**self.info, **updates})


class _ModuleHook:
    """The hook of one module: λ-folded scale and shift, plus optional support bounds."""

    def __init__(self, amap: AffineMap, support: str, module: nn.Module) -> None:
        param = next(module.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None else torch.float32
        self.amap = amap
        bounds = amap.support(support)
        self.bounds = None if bounds is None else tuple(self._cast(b) for b in bounds)
        self.omega_minus_one = amap.omega.to(self.device, torch.float32) - 1
        self.beta = amap.beta.to(self.device, torch.float32)
        self.scale = self.shift = None

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype)

    def set_strength(self, strength: torch.Tensor) -> None:
        """Precompute ω̃ = 1 + λ(ω − 1) and λβ; a (B,) strength gives (B, 1, D) tensors."""
        lam = strength.to(self.device, torch.float32)
        if lam.ndim == 1:
            lam = lam.view(-1, 1, 1)
        self.scale = self._cast(1 + lam * self.omega_minus_one)
        self.shift = self._cast(lam * self.beta)

    def __call__(self, module: nn.Module, args: object, output: object) -> object:
        a = output[0] if isinstance(output, tuple) else output
        steered = torch.addcmul(self.shift, a, self.scale)
        if self.bounds is not None:
            lo, hi = self.bounds
            steered = torch.where((a >= lo) & (a <= hi), steered, a)
        if isinstance(output, tuple):
            return (steered, *output[1:])
        return steered


class SteeringHandle:
    """Hooks of one steering on one model; change λ with set_strength, undo with remove."""

    def __init__(self, steering: Steering, model: nn.Module, strength: Strength, support: str):
        if support not in SUPPORTS:
            raise ActSteerError(f"unknown support {support!r}; choose one of {', '.join(SUPPORTS)}")
        from actsteer.artifact import check_compatible

        check_compatible(steering, model)
        lookup = dict(model.named_modules())
        self.steering = steering
        self.hooks = {
            name: _ModuleHook(amap, support, lookup[name]) for name, amap in steering.maps.items()
        }
        self.modules = {name: lookup[name] for name in steering.maps}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.set_strength(strength)

    def set_strength(self, strength: Strength) -> None:
        """Change λ. A scalar λ = 0 removes the hooks, so outputs are the untouched model's."""
        self.steering.check_strength(strength)
        lam = torch.as_tensor(strength, dtype=torch.float32)
        if lam.ndim > 1:
            raise ActSteerError(f"strength must be a number or a (batch,) tensor, got {lam.shape}")
        self._unhook()
        if lam.ndim == 0 and lam.item() == 0.0:
            return
        for name, hook in self.hooks.items():
            hook.set_strength(lam)
            self.handles.append(self.modules[name].register_forward_hook(hook))

    def _unhook(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def remove(self) -> None:
        """Detach every hook: the model is exactly the untouched model again."""
        self._unhook()
