"""Which fit settings serve mitigation? Each candidate at matched cost, on held-out texts.

SmolLM2-135M-Instruct (float32, CPU), toxic (source) → neutral (target) lines of
$ACTSTEER_DATA/toxicity_fit: fits on the first N train lines (source.txt, target.txt), every
measure on the held-out pairs (source_val.txt, target_val.txt; 128 each by default), which no
fit sees. For every candidate (method, modules, pooling, support and the pooling its bounds
come from, mode, N):
1. fit it, then calibrate it (actsteer.calibrate) to ΔPPL ≤ +1 on held-out WikiText-2, so all
   candidates are compared at the same cost, the rule the paper tables use;
2. effect at that λ: the change of the held-out likelihood gap (mean NLL per token of toxic
   lines − of neutral lines, nats; the effect `calibrate_modules` ranks module presets by);
3. transport at λ = 1: the end-to-end W2 distance (LinEAS's loss) between the held-out source
   lines through the steered model and the held-out target lines on the plain model, on the
   candidate's modules, relative to the plain model's distance (< 1: closer to the target);
4. the fraction of held-out source token activations inside the candidate's support (the
   map's reach; 1 for support "all").
Results go to a resumable JSON (--out) and a table; rows are sorted by effect.

  .venv/bin/python benchmarks/defaults_study.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, begin, load_json, read_lines, save_json, table

import actsteer
from actsteer.calibration import likelihood_gap
from actsteer.capture import record
from actsteer.lineas import end_to_end_distance
from actsteer.modes import Independent

#: name → fit options (pairs: how many train lines per set), every pooling explicit (mean is
#: linear-act's default; run D1 relied on it, hence RENAMED).
CANDIDATES: dict[str, dict[str, Any]] = {
    "linear-act post-attn-ln mean q0-100": {"modules": "post-attn-ln", "pooling": "mean"},
    "linear-act post-attn-ln mean all": {
        "modules": "post-attn-ln",
        "pooling": "mean",
        "support": "all",
    },
    "linear-act post-attn-ln all-tokens q0-100": {"modules": "post-attn-ln", "pooling": "all"},
    "linear-act post-attn-ln all-tokens all": {
        "modules": "post-attn-ln",
        "pooling": "all",
        "support": "all",
    },
    "linear-act post-attn-ln mean, support from tokens": {
        "modules": "post-attn-ln",
        "pooling": "mean",
        "support_pooling": "all",
    },
    "linear-act post-attn-ln mean sequential": {
        "modules": "post-attn-ln",
        "pooling": "mean",
        "mode": "sequential",
    },
    "linear-act post-attn-ln mean 32 pairs": {
        "modules": "post-attn-ln",
        "pooling": "mean",
        "pairs": 32,
    },
    "linear-act post-attn-ln mean 1200 pairs": {
        "modules": "post-attn-ln",
        "pooling": "mean",
        "pairs": 1200,
    },
    "linear-act attn-out mean": {"modules": "attn-out", "pooling": "mean"},
    "linear-act attn-out all-tokens": {"modules": "attn-out", "pooling": "all"},
    "linear-act attn-out mean, support from tokens": {
        "modules": "attn-out",
        "pooling": "mean",
        "support_pooling": "all",
    },
    "linear-act attn-out mean sequential": {
        "modules": "attn-out",
        "pooling": "mean",
        "mode": "sequential",
    },
    "linear-act residual mean": {"modules": "residual", "pooling": "mean"},
    "linear-act layernorms mean": {"modules": "layernorms", "pooling": "mean"},
    "mean-act post-attn-ln mean": {
        "method": "mean-act",
        "modules": "post-attn-ln",
        "pooling": "mean",
    },
    "lineas post-attn-ln": {"method": "lineas", "modules": "post-attn-ln"},
    "lineas attn-out": {"method": "lineas", "modules": "attn-out"},
    # the all-tokens counterparts of D1's mean-pooled candidates
    "linear-act post-attn-ln all-tokens 32 pairs": {
        "modules": "post-attn-ln",
        "pooling": "all",
        "pairs": 32,
    },
    "linear-act post-attn-ln all-tokens 1200 pairs": {
        "modules": "post-attn-ln",
        "pooling": "all",
        "pairs": 1200,
    },
    "linear-act post-attn-ln all-tokens sequential": {
        "modules": "post-attn-ln",
        "pooling": "all",
        "mode": "sequential",
    },
    "linear-act residual all-tokens": {"modules": "residual", "pooling": "all"},
    "linear-act layernorms all-tokens": {"modules": "layernorms", "pooling": "all"},
    "mean-act post-attn-ln all-tokens": {
        "method": "mean-act",
        "modules": "post-attn-ln",
        "pooling": "all",
    },
}
#: The names of run D1, which relied on the then default (mean) pooling, → these.
RENAMED = {
    "linear-act post-attn-ln mean q0-100 (default)": "linear-act post-attn-ln mean q0-100",
    "linear-act post-attn-ln sequential": "linear-act post-attn-ln mean sequential",
    "linear-act post-attn-ln 32 pairs": "linear-act post-attn-ln mean 32 pairs",
    "linear-act post-attn-ln 1200 pairs": "linear-act post-attn-ln mean 1200 pairs",
    "linear-act attn-out": "linear-act attn-out mean",
    "linear-act attn-out sequential": "linear-act attn-out mean sequential",
    "linear-act residual": "linear-act residual mean",
    "linear-act layernorms": "linear-act layernorms mean",
    "mean-act post-attn-ln": "mean-act post-attn-ln mean",
}
PAIRS = 400


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--held-out", type=int, default=128, help="held-out lines per set")
    parser.add_argument("--only", nargs="+", help="candidate names (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "defaults_study.json")
    return parser.parse_args(argv)


def inside_support(model: Any, tok: Any, steering: Any, texts: list[str]) -> float:
    """Fraction of the texts' token activations inside the steering's default support."""
    support = steering.default_support
    if support == "all":
        return 1.0
    tokens = record(model, tok, texts, list(steering.maps), pooling="all", progress=False)
    inside = total = 0
    for name, amap in steering.maps.items():
        lo, hi = amap.bounds[support]
        x = tokens[name]
        inside += int(((x >= lo) & (x <= hi)).sum())
        total += x.numel()
    return inside / total


def transport(model: Any, tok: Any, steering: Any, source: list[str], target: list[str]) -> float:
    """End-to-end W2 of held-out source (steered, λ = 1) to target (plain) ÷ the plain one."""
    names = list(steering.maps)
    plain_target = record(model, tok, target, names, progress=False)
    plain_source = record(model, tok, source, names, progress=False)
    with steering.applied(model, 1.0):
        steered = record(model, tok, source, names, progress=False)
    return end_to_end_distance(steered, plain_target) / end_to_end_distance(
        plain_source, plain_target
    )


def study(name: str, options: dict[str, Any], model: Any, tok: Any, held: tuple) -> dict:
    options = dict(options)
    pairs = options.pop("pairs", PAIRS)
    source, target = read_lines("source", count=pairs), read_lines("target", count=pairs)
    fit_options = dict(options)
    if "support_pooling" in fit_options:  # a setting of the independent mode
        fit_options["mode"] = Independent(support_pooling=fit_options.pop("support_pooling"))
    started = time.perf_counter()
    steering = actsteer.fit(model, tok, source=source, target=target, progress=False, **fit_options)
    fitted = time.perf_counter() - started
    calibration = actsteer.calibrate(steering, model, tok, budget=1.0)
    with steering.applied(model, calibration.strength):
        gap = likelihood_gap(model, tok, *held)
    return {
        "options": {**options, "pairs": pairs},
        "modules": len(steering.maps),
        "strength": calibration.strength,
        "delta_ppl": calibration.cost,
        "gap": gap,
        "transport": transport(model, tok, steering, *held),
        "inside_support": inside_support(model, tok, steering, held[0]),
        "fit_seconds": fitted,
        "calibration_seconds": calibration.seconds,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = begin("benchmarks/defaults_study.py", argv, args.threads)
    model, tok = actsteer.load_model("smollm2-135m")
    held = (
        read_lines("source_val", count=args.held_out),
        read_lines("target_val", count=args.held_out),
    )
    results = load_json(args.out)
    results = {RENAMED.get(name, name): result for name, result in results.items()}
    if "plain gap" not in results:
        results["plain gap"] = likelihood_gap(model, tok, *held)
    for name in args.only or CANDIDATES:
        if name not in results:
            results[name] = study(name, CANDIDATES[name], model, tok, held)
            save_json(args.out, results)
            print(f"  {name}: {results[name]}", flush=True)
    plain = results["plain gap"]
    rows = sorted(
        (
            [
                name,
                f"{r['strength']:.3g}",
                f"{r['delta_ppl']:+.2f}",
                f"{r['gap'] - plain:+.4f}",
                f"{r['transport']:.2f}",
                f"{100 * r['inside_support']:.0f}%",
                f"{r['fit_seconds']:.0f}",
            ]
            for name, r in results.items()
            if name != "plain gap" and name in CANDIDATES
        ),
        key=lambda row: -float(row[3]),
    )
    header = [
        "candidate", "λ (ΔPPL ≤ 1)", "ΔPPL", "effect (Δ gap, nats)", "W2 ÷ plain at λ=1",
        "tokens in support", "fit s",
    ]  # fmt: skip
    print(f"\nplain held-out gap: {plain:.4f} nats ({len(held[0])}+{len(held[1])} lines)\n")
    print(table(header, rows))
    print(f"\ncommand: {run.command}, {run.seconds():.0f} s in all; torch {torch.__version__}")


if __name__ == "__main__":
    main()
