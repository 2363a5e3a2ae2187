"""What a gate costs in generation: gated ÷ ungated throughput of the same steering, one run.

SmolLM2-135M-Instruct float32, Mean-AcT at `attn-out` (30 hooks; the gate study's setting)
fitted on 64+64 toxic/neutral lines, λ = 1, support q0-100; its gates fitted on the same lines.
Variants, interleaved and rotated every round: unsteered, ungated, token gate, context gate.
End to end: greedy `generate` of exactly --new-tokens tokens at batch 8 and 1; the figure is
the median over rounds of the per-round ratio gated ÷ ungated (target ≥ 0.97).

  .venv/bin/python benchmarks/gate_overhead.py [--rounds 10]
"""

from __future__ import annotations

import argparse
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

VARIANTS = ("unsteered", "ungated", "token gate", "context gate")
TARGET = 0.97


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--new-tokens", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = begin("benchmarks/gate_overhead.py", argv, args.threads)
    model, tok = actsteer.load_model("smollm2-135m")
    source, target = read_lines("source", count=64), read_lines("target", count=64)
    steering = actsteer.fit(
        model, tok, source, target, method="mean-act", modules="attn-out", progress=False
    )
    gated = steering.with_gate(model, tok, source, target, "token", progress=False)
    steerings = {
        "ungated": steering,
        "token gate": gated,
        "context gate": gated.with_gate_settings(kind="context"),
    }
    tps = generate_rounds(
        model, tok, {"unsteered": None, **steerings}, args.batch_sizes, args.new_tokens,
        args.rounds,
    )  # fmt: skip
    rows, verdicts = [], []
    for b, per in tps.items():
        for name in VARIANTS[2:]:
            ratios = [g / u for g, u in zip(per[name], per["ungated"], strict=True)]
            verdicts.append(statistics.median(ratios))
            rows.append([
                f"generate, batch {b} × {args.new_tokens} tokens",
                f"{statistics.median(per['ungated']):.1f} tok/s", name,
                f"{statistics.median(per[name]):.1f} tok/s", fmt_spread(ratios),
            ])  # fmt: skip
        plain = [u / p for u, p in zip(per["ungated"], per["unsteered"], strict=True)]
        rows.append([f"generate, batch {b}", "(unsteered)", "ungated ÷ unsteered", "",
                     fmt_spread(plain)])  # fmt: skip
    print()
    print("## Gate overhead")
    print(f"- machine: {run.env}")
    print(f"- command: {run.command}; {args.rounds} rounds; wall time {run.seconds():.0f} s")
    print(f"- contention: {contention()}")
    print()
    print(table(["measurement", "ungated", "variant", "gated", "ratio median (min–max)"], rows))
    verdict = "met" if min(verdicts) >= TARGET else "MISSED"
    print(f"\nVerdict: gated ÷ ungated, worst median {min(verdicts):.3f} vs ≥ {TARGET}: {verdict}.")


if __name__ == "__main__":
    main()
