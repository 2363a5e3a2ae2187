"""Small statistics shared by the tasks: bootstrap intervals of a mean and of a paired
difference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Interval = tuple[float, float]


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[int] | np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of the mean of `values`.

    groups: a cluster id per value (e.g. the prompt a continuation came from). Clusters are
    resampled whole, so several samples of one prompt do not pass for independent evidence.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    if groups is None:
        sums, counts = values, np.ones_like(values)
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        sums = np.bincount(inverse, weights=values)
        counts = np.bincount(inverse).astype(np.float64)
    picks = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return (float(lo), float(hi))


def paired_bootstrap_diff(
    treated: Sequence[float] | np.ndarray,
    control: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, Interval]:
    """mean(treated − control) and its percentile-bootstrap interval, for values paired by
    position (e.g. the same prompt under two steerings): pairs are resampled whole, so the
    interval reflects the differences' spread, not each arm's."""
    a = np.asarray(treated, dtype=np.float64)
    b = np.asarray(control, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired values need equal, non-empty 1-D arrays: {a.shape}, {b.shape}")
    diff = a - b
    picks = np.random.default_rng(seed).integers(0, diff.size, size=(n_boot, diff.size))
    means = diff[picks].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(diff.mean()), (float(lo), float(hi))
