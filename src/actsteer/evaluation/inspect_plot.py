"""A steering at a glance: the spread of ω and β per module, and what it does to a few units.

Pure functions over a Steering and activation tensors, returning a matplotlib Figure (built
without pyplot, so no display backend is involved); the caller saves it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from actsteer.errors import ActSteerError
from actsteer.extras import require
from actsteer.maps import UnitMap
from actsteer.steering import Steering

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The quantiles (in [0, 1]) drawn as the band around the median of ω and β per module.
BAND = (0.05, 0.95)


def short_names(names: Sequence[str]) -> list[str]:
    """Module names without the parts all of them share (prefix and suffix), for tick labels."""
    names = list(names)
    if len(names) < 2:
        return [n.rsplit(".", 1)[-1] for n in names]
    parts = [n.split(".") for n in names]
    prefix = len(os.path.commonprefix(parts))
    suffix = len(os.path.commonprefix([p[::-1] for p in parts]))
    shortest = min(len(p) for p in parts)
    if prefix + suffix >= shortest:  # nothing distinguishes some names: keep the suffix
        suffix = max(0, shortest - prefix - 1)
    return [".".join(p[prefix : len(p) - suffix]) or n for p, n in zip(parts, names, strict=True)]


def spread(values: torch.Tensor) -> tuple[float, float, float]:
    """(5% quantile, median, 95% quantile) of a 1-D tensor."""
    q = torch.tensor([BAND[0], 0.5, BAND[1]], dtype=torch.float32)
    low, mid, high = torch.quantile(values.detach().float().cpu(), q).tolist()
    return low, mid, high


def middle_module(steering: Steering) -> str:
    """The steered module in the middle of the layer order."""
    names = list(steering.maps)
    if not names:
        raise ActSteerError("the steering has no modules")
    return names[len(names) // 2]


def top_units(amap: UnitMap, samples: torch.Tensor, count: int = 4) -> list[int]:
    """The `count` units the map moves most: largest |β| + |ω − 1|·std(source activations)
    (ω, β: the map's line, `UnitMap.line`)."""
    std = samples.detach().float().cpu().std(0) if samples.shape[0] > 1 else 0.0
    omega, beta = (t.float().cpu() for t in amap.line())
    score = beta.abs() + (omega - 1).abs() * std
    return score.topk(min(count, amap.dim)).indices.tolist()


def _draw_spread(ax, steering: Steering, which: str, reference: float) -> None:
    """Median and 5–95% band of ω or β per module, in layer order."""
    names = list(steering.maps)
    rows = [spread(steering.maps[n].line()[0 if which == "omega" else 1]) for n in names]
    xs = list(range(len(names)))
    symbol = "ω" if which == "omega" else "β"
    ax.fill_between(
        xs, [r[0] for r in rows], [r[2] for r in rows], alpha=0.25, label="5–95% of units"
    )
    ax.plot(xs, [r[1] for r in rows], marker="o", markersize=3, label="median")
    ax.axhline(reference, color="0.4", linestyle="--", linewidth=1, label=f"{symbol} = {reference}")
    ax.set_title(f"{symbol} per module ({'scale' if which == 'omega' else 'shift'})")
    ax.set_xlabel("steered module (layer order)")
    ax.set_ylabel(symbol)
    labels = short_names(names)
    step = max(1, len(names) // 32)  # keep at most ~32 labels readable
    ax.set_xticks(xs[::step], labels[::step], rotation=90, fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _draw_unit(
    ax, source: torch.Tensor, moved: torch.Tensor, unit: int, amap: UnitMap, bins: int
) -> None:
    """Histograms of one unit's source and transported activations."""
    a, b = source[:, unit].float().cpu(), moved[:, unit].float().cpu()
    low = float(torch.minimum(a.min(), b.min()))
    high = float(torch.maximum(a.max(), b.max()))
    if high <= low:
        high = low + 1e-6
    edges = torch.linspace(low, high, bins + 1).numpy()
    ax.hist(a.numpy(), bins=edges, alpha=0.55, label="source")
    ax.hist(b.numpy(), bins=edges, alpha=0.55, label="transported (λ=1)")
    omega, beta = (float(t[unit]) for t in amap.line())
    fit = "" if amap.kind == "affine" else f"{amap.kind}, line "
    ax.set_title(f"unit {unit}: {fit}ω={omega:.2f}, β={beta:+.2f}", fontsize=9)
    ax.set_xlabel("activation")
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)


def steering_figure(
    steering: Steering,
    source: torch.Tensor | None = None,
    module: str | None = None,
    *,
    support: str | None = None,
    units: int = 4,
    bins: int = 40,
    title: str | None = None,
) -> Figure:
    """The figure of `actsteer inspect --plot`.

    Top row: ω and β per steered module (median, 5–95% band over units; of the least-squares
    line through the knots for quantile maps). With `source`
    activations (samples × units) of `module` (default: the middle one), a bottom row of
    histograms for its `units` most-moved units: source vs transported at λ = 1 under `support`
    (default: the steering's). The target distribution is not drawn: it is not in the file.
    """
    if not steering.maps:
        raise ActSteerError("the steering has no modules to plot")
    has_units = source is not None
    figure = require("matplotlib.figure", "eval", "drawing a steering (inspect --plot)")
    fig = figure.Figure(figsize=(14, 9.5 if has_units else 5), layout="constrained")
    grid = fig.add_gridspec(2 if has_units else 1, 4, height_ratios=[1.3, 1] if has_units else None)
    _draw_spread(fig.add_subplot(grid[0, :2]), steering, "omega", 1.0)
    _draw_spread(fig.add_subplot(grid[0, 2:]), steering, "beta", 0.0)
    if source is not None:
        module = module or middle_module(steering)
        if module not in steering.maps:
            raise ActSteerError(f"module {module!r} is not steered by this steering")
        amap = steering.maps[module]
        if source.ndim != 2 or source.shape[1] != amap.dim:
            raise ActSteerError(
                f"activations of shape {tuple(source.shape)} do not match module {module!r} "
                f"({amap.dim} units)"
            )
        source = source.detach().float().cpu()
        moved = amap(source, 1.0, support or steering.default_support)
        chosen = top_units(amap, source, units)
        for column, unit in enumerate(chosen):
            _draw_unit(fig.add_subplot(grid[1, column]), source, moved, unit, amap, bins)
        fig.text(
            0.5,
            -0.01,
            f"{module}: {source.shape[0]} source activations, its {len(chosen)} most-moved units "
            f"(|β| + |ω−1|·std); target texts are not in the file, so not drawn",
            ha="center",
            fontsize=9,
        )
    fig.suptitle(title or f"{steering.method}: {len(steering.maps)} steered modules")
    return fig
