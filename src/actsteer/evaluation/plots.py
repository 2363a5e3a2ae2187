"""PNG plots of a sweep: per task, each metric against λ, one line per steering.

Steerings evaluated at several strengths are lines with markers (and a shaded 95% interval
where the task gives one); a plain model (no steering) is a dashed horizontal reference line.
Reads only the sweep's JSON content, so plots can be redrawn from a results file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from actsteer.errors import ActSteerError
from actsteer.extras import require


def _latest_options(entries: list[dict[str, Any]], task: str) -> str:
    """The options key of a task's most recent entry: what the current sweep ran with."""
    return [e for e in entries if e["task"] == task][-1]["options_key"]


def plot_sweep(
    results: Mapping[str, Any] | str | Path,
    out_dir: str | Path | None = None,
    stem: str | None = None,
) -> list[Path]:
    """Write `<stem>_<task>.png` per task into out_dir; returns the paths written.

    results: the sweep JSON content, or the path of the JSON file (then out_dir and stem
    default to its folder and name).
    """
    matplotlib = require("matplotlib", "eval", "plotting sweep results")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(results, Mapping):
        path = Path(results)
        if not path.is_file():
            raise ActSteerError(f"sweep results file not found: {path}")
        out_dir = out_dir or path.parent
        stem = stem or path.stem
        results = cast(Mapping[str, Any], json.loads(path.read_text(encoding="utf-8")))
    if out_dir is None or stem is None:
        raise ActSteerError("give out_dir and stem when plotting results that are not a file")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = results.get("entries", [])
    written = []
    for task in dict.fromkeys(e["task"] for e in entries):
        key = _latest_options(entries, task)
        rows = [e for e in entries if e["task"] == task and e["options_key"] == key]
        labels = results.get("metric_labels", {}).get(task, {})
        metrics = list(labels) or list(dict.fromkeys(m for e in rows for m in e["metrics"]))
        metrics = [m for m in metrics if any(m in e["metrics"] for e in rows)]
        if not metrics:
            continue
        columns = min(2, len(metrics))
        n_rows = math.ceil(len(metrics) / columns)
        fig, axes = plt.subplots(
            n_rows, columns, figsize=(6.4 * columns, 4.4 * n_rows), squeeze=False
        )
        for ax, metric in zip(axes.flat, metrics, strict=False):
            _plot_metric(ax, rows, metric, results.get("steerings", {}))
            ax.set_title(labels.get(metric, metric))
            ax.set_xlabel("strength λ")
            ax.set_ylabel(labels.get(metric, metric))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(metrics) :]:
            ax.set_visible(False)
        settings = rows[-1].get("result", {}).get("settings", {})
        what = f"{task} ({settings['concept']})" if settings.get("concept") else task
        data = f", data {settings['data']}" if settings.get("data") else ""
        fig.suptitle(f"{what} vs steering strength — model {results.get('model', '?')}{data}")
        fig.tight_layout()
        target = out_dir / f"{stem}_{task}.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written


def _plot_metric(ax, rows: list[dict[str, Any]], metric: str, steerings: Mapping) -> None:
    """One subplot: a line per steering over λ, a dashed line for a plain model."""
    for name in dict.fromkeys(e["steering"] for e in rows):
        points = sorted(
            (e["strength"], e["metrics"][metric], e.get("intervals", {}).get(metric))
            for e in rows
            if e["steering"] == name and metric in e["metrics"] and e["metrics"][metric] is not None
        )
        if not points:
            continue
        method = (steerings.get(name) or {}).get("method")
        label = name if method in (None, name) else f"{name} ({method})"
        if (steerings.get(name) or {}).get("plain"):
            ax.axhline(points[0][1], color="0.35", linestyle="--", label=f"{name} (no steering)")
            continue
        xs = [p[0] for p in points]
        (line,) = ax.plot(xs, [p[1] for p in points], marker="o", markersize=4, label=label)
        bands = [p[2] for p in points]
        if all(b is not None and None not in b for b in bands):
            ax.fill_between(
                xs, [b[0] for b in bands], [b[1] for b in bands], color=line.get_color(), alpha=0.15
            )
