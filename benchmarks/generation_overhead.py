"""Generation overhead of steering hooks: steered ÷ unsteered throughput in one process.

Steering: Linear-AcT fitted on every norm output of SmolLM2-135M (`modules="layernorms"`, 61
modules) from toxic/neutral lines. Variants, interleaved and rotated within every round:
unsteered, empty hooks (a forward hook doing nothing on each of the same modules: the floor of
any hook-based method), steered with the default support q0-100 (bounded) and with support
"all", each on the transport's three paths: the fused kernel of actsteer.kernels, its torch ops
(ACTSTEER_FUSED_KERNEL=0), and those torch ops under torch.compile (inductor on CPU).

  end to end   greedy `model.generate`, forced to exactly --new-tokens tokens, tokens/s
  hot path     one cached decode step (single-token forward on a KV cache) and one
               prompt forward, timed alone, many repetitions
  hook         the hook alone on one norm module, split into its parts (where the time goes)

Ratios are throughput ratios (steered ÷ unsteered; 1.0 = free). Each round gives one ratio;
the median over rounds is reported with min–max.

  .venv/bin/python benchmarks/generation_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import (
    begin,
    contention,
    fmt_spread,
    read_lines,
    rotated,
    table,
    throughput_ratios,
    variant,
    wait_for_quiet,
)

import actsteer
from actsteer.models import cache_keyword

VARIANTS = (
    "unsteered", "empty hooks", "q0-100", "all", "q0-100 torch ops", "all torch ops",
    "q0-100 compiled", "all compiled",
)  # fmt: skip
STEERED = VARIANTS[2:]
SUPPORTS = ("q0-100", "all")
#: The three paths of the transport compared (issue 25 §5), by the suffix of their variants.
PATHS = {"fused kernel": "", "torch ops": " torch ops", "torch.compile": " compiled"}
TARGET = 0.97
PROBE = "model.layers.15.post_attention_layernorm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fit-lines", type=int, default=64, help="toxic and neutral lines each")
    parser.add_argument("--rounds", type=int, default=6, help="end-to-end rounds")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hot-rounds", type=int, default=8, help="hot-path rounds")
    parser.add_argument("--hot-reps", type=int, default=6, help="repetitions per hot round")
    parser.add_argument("--hook-calls", type=int, default=3000, help="calls per hook timing")
    return parser.parse_args(argv)


def prompts(tok: Any, batch_size: int) -> dict[str, torch.Tensor]:
    """Left-padded toxic prompts that were not used for fitting."""
    texts = read_lines("source", start=1000, count=batch_size)
    return dict(tok(texts, return_tensors="pt", padding=True))


def end_to_end(
    model: torch.nn.Module, tok: Any, steering: actsteer.Steering, args: argparse.Namespace
) -> dict[int, dict[str, list[float]]]:
    """tokens/s per batch size and variant, one entry per round."""
    encoded = {b: prompts(tok, b) for b in args.batch_sizes}
    settings = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )

    def run(b: int, name: str) -> tuple[float, torch.Tensor]:
        with torch.inference_mode(), variant(steering, model, name):
            start = time.perf_counter()
            out = model.generate(**encoded[b], **settings)
            seconds = time.perf_counter() - start
        assert out.shape[1] - encoded[b]["input_ids"].shape[1] == args.new_tokens
        return b * args.new_tokens / seconds, out

    outputs = {}
    for b in args.batch_sizes:  # warm-up, and a check that steering changes the text
        for name in VARIANTS:
            outputs[b, name] = run(b, name)[1]
        changed = (outputs[b, "unsteered"] != outputs[b, "q0-100"]).any(dim=1).sum().item()
        print(f"  batch {b}: steering (q0-100) changed {changed}/{b} greedy continuations")
    tps: dict[int, dict[str, list[float]]] = {b: {n: [] for n in VARIANTS} for b in encoded}
    for r in range(args.rounds):
        busy = []
        for b in rotated(args.batch_sizes, r):
            for name in rotated(VARIANTS, r):
                busy.append(wait_for_quiet())
                tps[b][name].append(run(b, name)[0])
        last = {b: {n: round(v[-1], 1) for n, v in tps[b].items()} for b in tps}
        print(
            f"  round {r + 1}/{args.rounds} tokens/s: {last}; others' CPU before each run: "
            f"{max(busy):.0%} max",
            flush=True,
        )
    return tps


def hot_path(
    model: torch.nn.Module, tok: Any, steering: actsteer.Steering, args: argparse.Namespace
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of a cached decode step (batch 8 and 1) and a prompt forward (batch 8),
    per variant: the median of --hot-reps interleaved calls, one entry per round."""
    calls: dict[str, Callable[[], None]] = {}
    keyword = cache_keyword(model)
    for b in sorted(set(args.batch_sizes), reverse=True):
        enc = prompts(tok, b)
        with torch.inference_mode():
            out = model(**enc, use_cache=True)
        cache = getattr(out, keyword)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([enc["attention_mask"], torch.ones(b, 1, dtype=torch.long)], dim=1)

        def decode(token=token, mask=mask, cache=cache) -> None:
            model(input_ids=token, attention_mask=mask, use_cache=True, **{keyword: cache})
            cache.crop(-1)  # back to the prompt: every call does the same work

        calls[f"decode step, batch {b}"] = decode
    enc8 = prompts(tok, max(args.batch_sizes))
    calls[f"prompt forward, batch {max(args.batch_sizes)}"] = lambda: model(**enc8)

    times = {what: {n: [] for n in VARIANTS} for what in calls}
    for what, call in calls.items():
        for r in range(args.hot_rounds + 1):  # round 0 is a warm-up
            samples: dict[str, list[float]] = {n: [] for n in VARIANTS}
            wait_for_quiet()
            for rep in range(args.hot_reps):
                for name in rotated(VARIANTS, r + rep):
                    with torch.inference_mode(), variant(steering, model, name):
                        start = time.perf_counter()
                        call()
                        samples[name].append(time.perf_counter() - start)
            if r:
                for name in VARIANTS:
                    times[what][name].append(statistics.median(samples[name]))
        med = {n: f"{statistics.median(v) * 1e3:.1f} ms" for n, v in times[what].items()}
        print(f"  {what}: {med}", flush=True)
    return times


def time_call(fn: Callable[[], object], calls: int, repeats: int = 5) -> float:
    """Median over `repeats` of the mean seconds per call of `fn` over `calls` calls."""
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        results.append((time.perf_counter() - start) / calls)
    return statistics.median(results)


def hook_tensors(hook: Any, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(scale, shift, lo, hi) a steering hook uses on activation `a` (library internals: the
    hook's Transport in the current version, the per-layout `prepared` dict of older ones, or
    plain attributes of the oldest)."""
    transport = getattr(hook, "transport", None)
    if transport is not None:
        prepared = transport.prepare(hook.lam, a)
        return prepared.scale_view, prepared.shift_view, prepared.lo, prepared.hi
    prepared = getattr(hook, "prepared", None)
    if prepared:
        scale, shift, bounds = prepared[(0, a.ndim)]
    else:
        scale, shift, bounds = hook.scale, hook.shift, hook.bounds
    return scale, shift, *bounds


def hook_parts(hook: Any, a: torch.Tensor, n: int) -> dict[str, float]:
    """Seconds per call of each tensor op of the bounded-support (q0-100) torch-ops path."""
    scale, shift, lo, hi = hook_tensors(hook, a)
    steered = torch.addcmul(shift, a, scale)
    outside = torch.sub(a, torch.clamp(a, lo, hi)).sign_().abs_()
    return {
        "  part: addcmul(shift, a, scale)": time_call(lambda: torch.addcmul(shift, a, scale), n),
        "  part: |sign(a - clamp(a, lo, hi))|  [4 ops]": time_call(
            lambda: torch.sub(a, torch.clamp(a, lo, hi)).sign_().abs_(), n
        ),
        "  part: lerp(steered, a, outside)": time_call(lambda: torch.lerp(steered, a, outside), n),
    }


def hook_breakdown(
    model: torch.nn.Module, steering: actsteer.Steering, args: argparse.Namespace, tokens: int
) -> dict[str, float]:
    """Microseconds per call of one norm module and of the hook's parts, on a
    (batch 8, `tokens`, width) activation; tokens=1 is what a decode step sees."""
    module = dict(model.named_modules())[PROBE]
    x = torch.randn(8, tokens, model.config.hidden_size)
    n = args.hook_calls
    out: dict[str, float] = {}
    with torch.inference_mode():
        a = module(x)
        out["norm module, no hook"] = time_call(lambda: module(x), n)
        noop = module.register_forward_hook(lambda *_: None)
        out["norm module + empty Python forward hook"] = time_call(lambda: module(x), n)
        noop.remove()
        for name in STEERED:
            with variant(steering, model, name) as handle:
                hook = handle.forward_hooks[PROBE]  # what the module calls
                out[f"norm module + steering hook ({name})"] = time_call(lambda: module(x), n)
                out[f"hook body alone ({name})"] = time_call(lambda h=hook: h(module, (), a), n)
                if name == "q0-100 torch ops":
                    out.update(hook_parts(handle.hooks[PROBE], a, n))
    return {k: v * 1e6 for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = begin("benchmarks/generation_overhead.py", argv, args.threads)
    model, tok = actsteer.load_model("smollm2-135m")
    source = read_lines("source", count=args.fit_lines)
    target = read_lines("target", count=args.fit_lines)
    t0 = time.perf_counter()
    steering = actsteer.fit(
        model, tok, source=source, target=target, modules="layernorms", progress=False
    )
    print(f"fitted {len(steering.maps)} modules in {time.perf_counter() - t0:.1f} s")

    print("end to end (model.generate):")
    tps = end_to_end(model, tok, steering, args)
    print("hot path:")
    hot = hot_path(model, tok, steering, args)
    print("hook alone (µs per call):")
    hooks = {t: hook_breakdown(model, steering, args, t) for t in (1, 16)}
    for what in hooks[1]:
        print(f"  {what:<45} (8,1,D) {hooks[1][what]:7.1f}   (8,16,D) {hooks[16][what]:7.1f}")

    rows = []
    for b, per_variant in tps.items():
        r = throughput_ratios(per_variant, "higher")
        base = statistics.median(per_variant["unsteered"])
        for name in VARIANTS[1:]:
            rows.append(
                [
                    f"end to end: generate, batch {b} × {args.new_tokens} tokens",
                    f"{base:.1f} tok/s",
                    name,
                    f"{statistics.median(per_variant[name]):.1f} tok/s",
                    fmt_spread(r[name]),
                ]
            )
    for what, per_variant in hot.items():
        r = throughput_ratios(per_variant, "lower")
        base = statistics.median(per_variant["unsteered"]) * 1e3
        for name in VARIANTS[1:]:
            rows.append(
                [
                    f"hot path: {what}",
                    f"{base:.1f} ms",
                    name,
                    f"{statistics.median(per_variant[name]) * 1e3:.1f} ms",
                    fmt_spread(r[name]),
                ]
            )
    header = ["measurement", "unsteered", "support", "steered", "ratio median (min–max)"]
    n_hooks = len(steering.maps)
    hook_rows = [[k, f"{hooks[1][k]:.1f}", f"{hooks[16][k]:.1f}"] for k in hooks[1]]
    extra = {
        s: hooks[1][f"norm module + steering hook ({s})"] - hooks[1]["norm module, no hook"]
        for s in STEERED
    }
    e2e = {
        path: {
            b: min(
                statistics.median(throughput_ratios(tps[b], "higher")[s + suffix]) for s in SUPPORTS
            )
            for b in tps
        }
        for path, suffix in PATHS.items()
    }
    print()
    print("## Generation overhead")
    print()
    print(f"- machine: {run.env}")
    print(f"- command: {run.command}")
    print(
        f"- settings: SmolLM2-135M-Instruct float32, Linear-AcT, modules=layernorms "
        f"({n_hooks} hooks), fitted on {args.fit_lines}+{args.fit_lines} toxic/neutral lines, "
        f"λ=1; greedy, exactly {args.new_tokens} new tokens; {args.rounds} end-to-end rounds, "
        f"{args.hot_rounds} hot-path rounds × {args.hot_reps} interleaved reps; variant order "
        "rotated every round"
    )
    print(f"- wall time: {run.seconds():.0f} s; contention: {contention()}")
    print()
    print(table(header, rows))
    print()
    print(table(["hook alone, µs per call", "(8, 1, 576)", "(8, 16, 576)"], hook_rows))
    print()
    print(
        f"Hook cost per decode step ≈ {n_hooks} × per-hook extra: "
        + ", ".join(f"{s} {n_hooks * extra[s] / 1e3:.2f} ms" for s in STEERED)
        + "."
    )
    for path, ratios in e2e.items():
        verdict = "met" if min(ratios.values()) >= TARGET else "MISSED"
        print(
            f"Verdict, {path}: end-to-end median ratio (worst support) "
            + ", ".join(f"batch {b}: {v:.3f}" for b, v in ratios.items())
            + f" vs target ≥ {TARGET}: {verdict}."
        )


if __name__ == "__main__":
    main()
