"""What the non-finite output check of actsteer.guards costs a steered generation.

SmolLM2-135M steered by Linear-AcT on every norm output (61 modules, q0-100, λ = 1). Two
variants, interleaved and rotated every round: the steering as applied ("guarded": the one
forward hook on the model that sums the last position's logits each forward) and the same
with that hook removed ("unguarded"). Each round times greedy `generate` of --new-tokens
tokens (forced) at batch 1 and 8, --reps repetitions per variant, their median; reported: the
median over rounds of guarded ÷ unguarded time (1.0 = free), with min–max, and the check's
own cost on the logits of one decode step.

  .venv/bin/python benchmarks/guard_overhead.py --rounds 7
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from _common import fmt_spread, read_lines, rotated, set_threads

import actsteer
from actsteer.guards import guard_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    set_threads()
    model, tok = actsteer.load_model("smollm2-135m")
    steering = actsteer.fit(
        model, tok, read_lines("source", 0, 32), read_lines("target", 0, 32),
        modules="layernorms", progress=False,
    )  # fmt: skip
    prompts = {b: tok(["The weather today is"] * b, return_tensors="pt") for b in (1, 8)}
    options = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    ratios: dict[int, list[float]] = {1: [], 8: []}
    with steering.applied(model, 1.0), torch.inference_mode():
        guard = guard_of(model)
        check = guard.hook
        assert check is not None, "the guard's check is registered while steered"

        def timed(batch: int, guarded: bool) -> float:
            if guarded and guard.hook is None:
                guard.hook = model.register_forward_hook(guard._check, with_kwargs=True)
            elif not guarded and guard.hook is not None:
                guard.hook.remove()
                guard.hook = None
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                model.generate(**prompts[batch], do_sample=False, **options)
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        timed(8, True)  # warm-up
        for round_index in range(args.rounds):
            for batch in (1, 8):
                seconds = {
                    name: timed(batch, name == "guarded")
                    for name in rotated(["guarded", "unguarded"], round_index)
                }
                ratios[batch].append(seconds["guarded"] / seconds["unguarded"])
        logits = model(**prompts[8]).logits[..., -1:, :]
        start = time.perf_counter()
        for _ in range(200):
            math.isfinite(float(logits[..., -1, :].sum(dtype=torch.float32)))
        check_us = (time.perf_counter() - start) / 200 * 1e6
    print(f"{args.rounds} rounds × {args.reps} reps, {args.new_tokens} new tokens, 61 modules")
    print("| batch | guarded ÷ unguarded time, median (min–max) |")
    print("|---|---|")
    for batch, values in ratios.items():
        print(f"| {batch} | {fmt_spread(values)} |")
    print(f"the check alone on batch 8's last logits (8 × {logits.shape[-1]}): {check_us:.0f} µs")


if __name__ == "__main__":
    main()
