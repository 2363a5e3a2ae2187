"""Run-time guards of applied steerings, all outside the per-module hot path:

- the same steering applied twice to one model (nested `applied`) is refused;
- a λ that moves activations many times their spread on the fit data gets a warning, once per
  strength set, and one that moves them a thousandfold is refused unless the steering was
  extrapolated to it on purpose (far beyond the fit, outputs collapse to empty or constant text
  long before they turn NaN);
- non-finite outputs: one check per forward of the model (the sum of its last position's
  logits: about 0.1% of the LM head's matmul); when it fails, one diagnostic rerun finds the
  first steered module whose output is non-finite, and the error names it and its λ.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Protocol

import torch
from torch import nn

from actsteer.errors import ActSteerError
from actsteer.maps import UnitMap

#: a shift larger than this many times the source's per-unit range (q0-100) gets a warning
SPREAD_WARNING = 10.0
#: and one larger than this is refused unless `extrapolated` allowed that λ
SPREAD_REFUSAL = 1000.0
#: a unit's range counts as at least this fraction of its module's median unit range, so a
#: unit the fit data never moves (a dead norm channel: range 0) and a small shift of it is not
#: read as an infinite one
RANGE_FLOOR = 0.1


class Guarded(Protocol):
    """What the guards need of a steering handle."""

    steering: Any
    modules: dict[str, nn.Module]
    strength: torch.Tensor
    handles: list


def describe_strength(strength: torch.Tensor) -> str:
    """λ for a message: one number, or the per-row values."""
    if strength.ndim == 0:
        return f"{strength.item():g}"
    return "[" + ", ".join(f"{v:g}" for v in strength.tolist()) + "]"


def reach(maps: dict[str, UnitMap]) -> tuple[float, str]:
    """The largest shift a map makes at |λ| = 1, over the source's range [lo, hi] of its unit,
    in units of hi − lo (floored at RANGE_FLOOR × the module's median range), and the module it
    occurs in (λ scales it linearly)."""
    worst, where = 0.0, ""
    for name, amap in maps.items():
        bounds = amap.bounds.get("q0-100")
        if bounds is None:
            continue
        lo, hi = (b.float() for b in bounds)
        shift = amap.reach()
        spread = hi - lo
        floor = max(RANGE_FLOOR * float(spread.median()), 1e-12)
        ratio = float((shift / spread.clamp_min(floor)).max())
        if ratio > worst:
            worst, where = ratio, name
    return worst, where


def check_far_strength(
    maps_reach: tuple[float, str], strength: torch.Tensor, allowed: float | None
) -> None:
    """Warn when λ moves some unit by more than SPREAD_WARNING × its range on the fit data
    (`maps_reach` from `reach`); refuse beyond SPREAD_REFUSAL × unless |λ| ≤ `allowed` (the
    steering's `extrapolated` upper end). ActAdd and ITI-c accept any λ, and large ones turn
    output to garbage, then to empty text, before it turns NaN."""
    lam = float(strength.abs().max()) if strength.numel() else 0.0
    worst, where = maps_reach
    far = lam * worst
    if far > SPREAD_REFUSAL and (allowed is None or lam > allowed):
        limit = SPREAD_REFUSAL / worst
        raise ActSteerError(
            f"λ = {describe_strength(strength)} shifts activations of {where!r} by up to "
            f"{far:.3g}× their range on the fit data: the output collapses (empty or constant "
            f"text) long before it turns NaN; choose |λ| ≤ {limit:.3g}, or go there on purpose "
            f"with steering.extrapolated({lam:.3g}) (CLI: --extrapolate {lam:.3g})"
        )
    if far > SPREAD_WARNING:
        warnings.warn(
            f"actsteer: λ = {describe_strength(strength)} shifts activations of {where!r} by up "
            f"to {far:.3g}× their range on the fit data (more than {SPREAD_WARNING:g}×): "
            "far outside what the fit supports, outputs are likely garbage; lower the strength",
            stacklevel=4,
        )


class ModelGuard:
    """The steerings applied to one model, and the one forward hook checking its output.

    It holds the model weakly: the registry keys guards by model weakly, and a guard that held
    its model would keep every model ever steered alive."""

    def __init__(self, model: nn.Module) -> None:
        self.model_ref = weakref.ref(model)
        self.active: list[Guarded] = []
        self.hook: torch.utils.hooks.RemovableHandle | None = None
        self.diagnosing = False

    @property
    def model(self) -> nn.Module:
        model = self.model_ref()
        assert model is not None, "a guard outlived its model"
        return model

    def update(self) -> None:
        """Check outputs while some handle has hooks on the model; not otherwise."""
        steered = any(handle.handles for handle in self.active)
        if steered and self.hook is None:
            self.hook = self.model.register_forward_hook(self._check, with_kwargs=True)
        elif not steered and self.hook is not None:
            self.hook.remove()
            self.hook = None

    def _check(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.diagnosing:
            return
        logits = getattr(output, "logits", output)
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            return
        last = (logits[..., -1, :] if logits.ndim >= 3 else logits).detach()
        # one summing pass (isfinite().all() costs 30x more on CPU); a sum that overflows while
        # every value is finite is confirmed value by value
        if math.isfinite(float(last.sum(dtype=torch.float32))) or bool(torch.isfinite(last).all()):
            return
        raise ActSteerError(self._diagnose(args, kwargs))

    def _diagnose(self, args: tuple, kwargs: dict) -> str:
        """Rerun the forward once with recorders after every steered module; name the first
        whose output is non-finite (or the largest one, when all are finite)."""
        steered = [(n, m, h) for h in self.active if h.handles for n, m in h.modules.items()]
        seen: list[tuple[str, bool, float]] = []

        def recorder(name: str) -> Any:
            def record(module: nn.Module, inputs: tuple, output: Any) -> None:
                tensor = output[0] if isinstance(output, tuple) else output
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    biggest = torch.nan_to_num(tensor.detach().abs(), nan=0.0).max()
                    seen.append((name, bool(torch.isfinite(tensor).all()), float(biggest)))

            return record

        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            rerun_args, rerun_kwargs = (), {"input_ids": ids, "use_cache": False}
        else:
            rerun_args, rerun_kwargs = args, {**kwargs, "use_cache": False}
        recorders = [module.register_forward_hook(recorder(name)) for name, module, _ in steered]
        self.diagnosing = True
        try:
            with torch.no_grad():
                self.model(*rerun_args, **rerun_kwargs)
        except Exception:  # a diagnosis only: what was seen before a failure still counts
            pass
        finally:
            self.diagnosing = False
            for handle in recorders:
                handle.remove()
        strengths = {name: describe_strength(h.strength) for name, _, h in steered}
        for name, finite, _ in seen:
            if not finite:
                return (
                    f"steering made activations non-finite (NaN or inf) at module {name!r}, "
                    f"steered at λ = {strengths[name]}; lower the strength"
                )
        if seen:
            name, _, biggest = max(seen, key=lambda s: s[2])
            return (
                "the model's output became non-finite (NaN or inf) under steering; every "
                f"steered module's output was finite, the largest |activation| {biggest:.3g} at "
                f"{name!r} (λ = {strengths[name]}), and the layers after it overflowed; lower "
                "the strength"
            )
        lams = sorted(set(strengths.values()))
        return f"the model's output became non-finite (NaN or inf) under steering at λ = {lams}"


_GUARDS: weakref.WeakKeyDictionary[nn.Module, ModelGuard] = weakref.WeakKeyDictionary()


def guard_of(model: nn.Module) -> ModelGuard:
    """The guard of `model` (made on first use)."""
    if model not in _GUARDS:
        _GUARDS[model] = ModelGuard(model)
    return _GUARDS[model]


def enter(handle: Guarded, model: nn.Module) -> None:
    """Register a new handle on `model`; the same steering twice (the same maps: also through
    `extrapolated`, which shares them) is a clear error."""
    guard = guard_of(model)
    if any(other.steering.maps is handle.steering.maps for other in guard.active):
        raise ActSteerError(
            "this steering is already applied to this model (a nested `applied` or a second "
            "`attach` would apply it twice); change its strength with handle.set_strength(λ) "
            "instead, or remove the first one"
        )
    guard.active.append(handle)


def leave(handle: Guarded, model: nn.Module) -> None:
    """Unregister a removed handle."""
    guard = guard_of(model)
    guard.active = [other for other in guard.active if other is not handle]
    guard.update()
