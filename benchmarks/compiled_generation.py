"""Compiled generation steered ÷ compiled plain, beside eager (issue 27 §5), in one run.

SmolLM2-135M-Instruct float32 on CPU, greedy `generate` of exactly --new-tokens tokens with a
static KV cache (transformers' fast-generation recipe), at batch 8 and 1. Two copies of the
model: one plain, one steered by Linear-AcT at `attn-out` (30 hooks, support q0-100, fitted on
32+32 toxic/neutral lines) at λ = 1, with the steering applied for the whole run (so its
traced hooks are compiled once, actsteer.compiled). Variants, interleaved and rotated every
round: eager plain, eager steered, compiled plain, compiled steered (each copy's forward
compiled with torch.compile after warm-up of the eager variants). Each round also sets the
compiled steered copy's λ to 0.5 and back, to show that λ changes recompile nothing (the number
of graphs dynamo compiled is printed before and after the timed rounds). The figure is the
median over rounds of the per-round ratio steered ÷ plain (target ≥ 0.97 compiled).

  .venv/bin/python benchmarks/compiled_generation.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _common import begin, contention, fmt_spread, read_lines, rotated, table, wait_for_quiet
from torch._dynamo.utils import counters

import actsteer

VARIANTS = ("eager plain", "eager steered", "compiled plain", "compiled steered")
TARGET = 0.97


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--new-tokens", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = begin("benchmarks/compiled_generation.py", argv, args.threads)
    plain, tok = actsteer.load_model("smollm2-135m")
    source, target = read_lines("source", count=32), read_lines("target", count=32)
    steering = actsteer.fit(plain, tok, source, target, modules="attn-out", progress=False)
    models = {"plain": plain, "steered": copy.deepcopy(plain), "compiled": copy.deepcopy(plain)}
    eager_handle = steering.attach(models["steered"], 1.0)
    models["compiled"].forward = torch.compile(models["compiled"].forward)
    handle = steering.attach(models["compiled"], 1.0)  # traced hooks (actsteer.compiled)
    prompts = {b: dict(tok(read_lines("source", 1000, b), return_tensors="pt", padding=True,
                           padding_side="left")) for b in args.batch_sizes}  # fmt: skip
    settings = dict(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
        pad_token_id=tok.pad_token_id, cache_implementation="static",
    )  # fmt: skip
    plain_forward = {"eager": plain.forward, "compiled": torch.compile(plain.forward)}
    steered = {"eager": models["steered"], "compiled": models["compiled"]}

    def tokens_per_second(b: int, variant: str) -> float:
        mode, name = variant.split()
        if name == "plain":
            plain.forward = plain_forward[mode]
        model = plain if name == "plain" else steered[mode]
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(**prompts[b], **settings)
            return b * args.new_tokens / (time.perf_counter() - start)

    started = time.perf_counter()
    for b in args.batch_sizes:  # warm-up, compiling every shape once
        for variant in VARIANTS:
            tokens_per_second(b, variant)
            tokens_per_second(b, variant)
    print(f"  warm-up and compilation: {time.perf_counter() - started:.0f} s", flush=True)
    same = []
    with torch.inference_mode():
        for b in args.batch_sizes:
            eager_ids, compiled_ids = (steered[m].generate(**prompts[b], **settings)
                                       for m in ("eager", "compiled"))  # fmt: skip
            same.append(f"batch {b}: {bool(torch.equal(eager_ids, compiled_ids))}")
    graphs_before = counters["stats"]["unique_graphs"]
    tps = {b: {v: [] for v in VARIANTS} for b in args.batch_sizes}
    for r in range(args.rounds):
        for b in rotated([str(b) for b in args.batch_sizes], r):
            for variant in rotated(VARIANTS, r):
                wait_for_quiet()
                tps[int(b)][variant].append(tokens_per_second(int(b), variant))
        handle.set_strength(0.5)
        handle.set_strength(1.0)
        print(f"  round {r + 1}/{args.rounds}", flush=True)
    graphs_after = counters["stats"]["unique_graphs"]
    rows, verdicts = [], []
    for b, per in tps.items():
        for mode in ("eager", "compiled"):
            ratios = [s / p for s, p in zip(per[f"{mode} steered"], per[f"{mode} plain"],
                                            strict=True)]  # fmt: skip
            if mode == "compiled":
                verdicts.append(statistics.median(ratios))
            rows.append([
                f"generate, batch {b} × {args.new_tokens} tokens, static cache", mode,
                f"{statistics.median(per[f'{mode} plain']):.1f} tok/s",
                f"{statistics.median(per[f'{mode} steered']):.1f} tok/s", fmt_spread(ratios),
            ])  # fmt: skip
    handle.remove()
    eager_handle.remove()
    print()
    print("## Compiled generation")
    print(f"- machine: {run.env}")
    print(f"- command: {run.command}; {args.rounds} rounds; wall time {run.seconds():.0f} s")
    print(f"- contention: {contention()}")
    print(f"- compiled steered tokens = eager steered tokens: {', '.join(same)}")
    print(f"- graphs compiled during the timed rounds (λ changed each round): "
          f"{graphs_after - graphs_before}")  # fmt: skip
    print()
    print(table(["measurement", "mode", "plain", "steered", "ratio median (min–max)"], rows))
    verdict = "met" if min(verdicts) >= TARGET else "MISSED"
    print(f"\nVerdict: compiled steered ÷ compiled plain, worst median {min(verdicts):.3f} vs "
          f"≥ {TARGET}: {verdict}.")  # fmt: skip


if __name__ == "__main__":
    main()
