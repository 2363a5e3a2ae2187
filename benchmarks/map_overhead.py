"""What a map's kind costs in generation: steered ÷ unsteered throughput of an affine map
(Linear-AcT, the fused kernel on CPU) and a piecewise one (quantile-act, torch ops), one run.

SmolLM2-135M-Instruct float32, both fitted on --modules (default `layernorms`, 61 hooks: the
generation benchmark's setting) from 64+64 toxic/neutral lines, λ = 1, support q0-100;
quantile-act at --knots. Variants, interleaved and rotated every round: unsteered, linear-act,
quantile-act. End to end: greedy `generate` of exactly --new-tokens tokens at batch 8 and 1;
the figure is the median over rounds of the per-round ratio steered ÷ unsteered (target ≥ 0.97
for quantile-act, issue 28).

  .venv/bin/python benchmarks/map_overhead.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from _common import (
    begin,
    contention,
    fmt_spread,
    generate_rounds,
    read_lines,
    table,
)

import actsteer
from actsteer.capture import record
from actsteer.maps import support_bounds
from actsteer.methods.quantile_act import fit_quantile

VARIANTS = ("unsteered", "linear-act", "quantile-act")
TARGET = 0.97


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--modules", default="layernorms")
    parser.add_argument("--knots", type=int, default=16)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = begin("benchmarks/map_overhead.py", argv, args.threads)
    model, tok = actsteer.load_model("smollm2-135m")
    source, target = read_lines("source", count=64), read_lines("target", count=64)
    affine = actsteer.fit(model, tok, source, target, modules=args.modules, progress=False)
    fit_source = record(model, tok, source, affine.modules, progress=False)
    fit_target = record(model, tok, target, affine.modules, progress=False)
    knots = {}
    for name in affine.modules:
        knots[name] = fit_quantile(fit_source[name], fit_target[name], knots=args.knots)
        knots[name].bounds = support_bounds(fit_source[name])
    steerings = {
        "linear-act": affine,
        "quantile-act": dataclasses.replace(affine, maps=knots),
    }
    tps = generate_rounds(
        model, tok, {"unsteered": None, **steerings}, args.batch_sizes, args.new_tokens,
        args.rounds,
    )  # fmt: skip
    rows, verdicts = [], []
    for b, per in tps.items():
        for name in VARIANTS[1:]:
            ratios = [s / u for s, u in zip(per[name], per["unsteered"], strict=True)]
            if name == "quantile-act":
                verdicts.append(statistics.median(ratios))
            rows.append([
                f"generate, batch {b} × {args.new_tokens} tokens",
                f"{statistics.median(per['unsteered']):.1f} tok/s", name,
                f"{statistics.median(per[name]):.1f} tok/s", fmt_spread(ratios),
            ])  # fmt: skip
    print()
    print(f"## Map overhead ({len(affine.maps)} modules, quantile-act K = {args.knots})")
    print(f"- machine: {run.env}")
    print(f"- command: {run.command}; {args.rounds} rounds; wall time {run.seconds():.0f} s")
    print(f"- contention: {contention()}")
    print()
    print(table(["measurement", "unsteered", "map", "steered", "ratio median (min–max)"], rows))
    verdict = "met" if min(verdicts) >= TARGET else "MISSED"
    print(f"\nVerdict: quantile-act ÷ unsteered, worst median {min(verdicts):.3f} vs ≥ {TARGET}: "
          f"{verdict}.")  # fmt: skip


if __name__ == "__main__":
    main()
