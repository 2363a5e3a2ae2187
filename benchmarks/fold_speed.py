"""Folded vs hooked vs unsteered generation throughput, side by side in one process.

Steering: Linear-AcT on SmolLM2-135M's input and post-attention norms and attention/MLP output
projections (120 modules; the foldable set: the final norm's shift feeds the LM head, which has
no bias), support "all", λ = 1. Variants, interleaved and rotated every round:

  unsteered  the plain model
  hooked     the plain model with the steering's forward hooks
  folded     a copy with the steering folded into its weights (`Steering.fold`), no hooks

Each round times one greedy `model.generate` per variant (exactly --new-tokens tokens) and gives
one throughput ratio per variant (÷ unsteered); the median over rounds is reported with min–max.

  .venv/bin/python benchmarks/fold_speed.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from _common import (
    fmt_spread,
    machine,
    read_lines,
    rotated,
    set_threads,
    table,
    throughput_ratios,
    wait_for_quiet,
)

import actsteer

MODULES = (
    r"model\.layers\.\d+\."
    r"(input_layernorm|post_attention_layernorm|self_attn\.o_proj|mlp\.down_proj)"
)
VARIANTS = ("unsteered", "hooked", "folded")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fit-lines", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    env = machine()
    print(env)
    model, tok = actsteer.load_model("smollm2-135m")
    steering = actsteer.fit(
        model, tok, read_lines("source", count=args.fit_lines),
        read_lines("target", count=args.fit_lines), modules=MODULES, support="all",
        progress=False,
    )  # fmt: skip
    folded = steering.fold(copy.deepcopy(model), 1.0, support="all")
    texts = read_lines("source", start=1000, count=args.batch_size)
    encoded = dict(tok(texts, return_tensors="pt", padding=True))
    settings = dict(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip

    def run(name: str) -> tuple[float, torch.Tensor]:
        target = folded if name == "folded" else model
        with torch.inference_mode():
            handle = steering.attach(model, 1.0, "all") if name == "hooked" else None
            start = time.perf_counter()
            out = target.generate(**encoded, **settings)
            seconds = time.perf_counter() - start
            if handle is not None:
                handle.remove()
        return args.batch_size * args.new_tokens / seconds, out

    warm = {name: run(name)[1] for name in VARIANTS}
    same = (warm["hooked"] == warm["folded"]).all(dim=1).sum().item()
    print(f"greedy continuations identical, folded vs hooked: {same}/{args.batch_size}")
    tps: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name in rotated(VARIANTS, r):
            wait_for_quiet()
            tps[name].append(run(name)[0])
        print(f"  round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f} tok/s" for n, v in tps.items()))
    rows = [
        [name, f"{statistics.median(tps[name]):.1f}", fmt_spread(per_round)]
        for name, per_round in throughput_ratios(tps, "higher").items()
    ]
    print()
    print("## Folded vs hooked")
    print()
    print(f"- machine: {env}")
    print(f"- command: `.venv/bin/python benchmarks/fold_speed.py {' '.join(sys.argv[1:])}`")
    print(
        f"- settings: {len(steering.maps)} modules, Linear-AcT, support all, λ=1; greedy, batch "
        f"{args.batch_size} × exactly {args.new_tokens} new tokens; {args.rounds} rounds; "
        f"unsteered median {statistics.median(tps['unsteered']):.1f} tok/s; greedy outputs "
        f"identical folded vs hooked for {same}/{args.batch_size} rows"
    )
    print()
    print(table(["variant", "tokens/s (median)", "÷ unsteered, median (min–max)"], rows))


if __name__ == "__main__":
    main()
