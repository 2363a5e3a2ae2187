"""Fit cost: `actsteer.fit` time ÷ plain forward passes over the same prompts.

Per round, interleaved and rotated: plain forward passes over the source and target prompts
(same tokenisation, right padding, batch size 16, max_length 128) as `model(**batch)` (the
stated baseline, LM head included) and as the decoder body alone (what fit runs, no LM head);
then Linear-AcT fits in mode independent and sequential for each module preset.
Reported: median over rounds of the per-round ratios fit ÷ forward and sequential ÷ independent.

Sequential fitting the way the reference code does it (one truncated re-run of the source
prompts per module, upstream maps applied) is measured once on a small subset (--naive-lines)
and stated analytically.

  .venv/bin/python benchmarks/fit_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

import torch
from _common import (
    begin,
    contention,
    fmt_spread,
    read_lines,
    rotated,
    table,
    wait_for_quiet,
)
from torch import nn

import actsteer
from actsteer.capture import Recorder, batches, forward_body, record, resolve_modules
from actsteer.methods import get_method
from actsteer.sequential import execution_order
from actsteer.tree import model_device

BATCH_SIZE = 16
MAX_LENGTH = 128
TARGET_FIT = 1.3
TARGET_SEQ = 2.5  # issue 14: both sets carried through the blocks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lines", type=int, default=128, help="toxic and neutral lines each")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["layernorms", "post-attn-ln"])
    parser.add_argument(
        "--naive-lines", type=int, default=32, help="lines each for the naive run (0: skip)"
    )
    return parser.parse_args(argv)


def forward_passes(model: nn.Module, tok: Any, texts: Sequence[Sequence[str]], body: bool) -> None:
    """Plain forward passes over each text set, batched exactly as fit batches them."""
    runner = model.model if body else model
    with torch.inference_mode():
        for group in texts:
            for batch in batches(tok, group, BATCH_SIZE, MAX_LENGTH, model_device(model)):
                if body:
                    runner(**batch, use_cache=False)
                else:
                    runner(**batch)


class _Stop(Exception):
    """Ends a truncated forward pass."""


def _stop(*_: object) -> None:
    raise _Stop


def naive_sequential_fit(
    model: nn.Module, tok: Any, source: list[str], target: list[str], modules: str
) -> int:
    """Sequential Linear-AcT the reference way: for each module in execution order, re-run the
    source prompts up to that module (a truncated pass) with all upstream maps applied.

    Returns the number of maps fitted. For comparison only; the library does not do this.
    """
    names = resolve_modules(model, modules)
    order = execution_order(model, tok, source[0], names)
    method = get_method("linear-act")
    target_samples = record(model, tok, target, names, progress=False)
    body = forward_body(model, names)
    lookup = dict(model.named_modules())
    maps: dict[str, Any] = {}
    for name in order:
        upstream = actsteer.Steering(dict(maps))
        recorder = Recorder(model, [name], "mean", None)
        stopper = lookup[name].register_forward_hook(_stop)
        try:
            with torch.inference_mode(), upstream.applied(model, 1.0, "q0-100"):
                for batch in batches(tok, source, BATCH_SIZE, MAX_LENGTH, model_device(model)):
                    recorder.mask = batch["attention_mask"].bool()
                    with suppress(_Stop):
                        body(**batch, use_cache=False)
        finally:
            stopper.remove()
            recorder.remove()
        maps[name] = method.fit(recorder.samples()[name], target_samples[name])
    return len(maps)


def analytic_naive_passes(model: nn.Module, modules: str) -> float:
    """Source-set body passes a truncated re-run per module costs: Σ over modules of the fraction
    of the blocks run before the module's output exists (attention ≈ 1/4 of a block's FLOPs, so
    a post-attention norm of block i costs i + 1/4 blocks; a final norm all L blocks)."""
    layers = model.config.num_hidden_layers
    total = 0.0
    for name in resolve_modules(model, modules):
        parts = name.split(".")
        if "layers" in parts:
            i = int(parts[parts.index("layers") + 1])
            total += i + (0.25 if "post_attention" in name else 0.0)
        else:
            total += layers
    return total / layers


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = begin("benchmarks/fit_cost.py", argv, args.threads)
    model, tok = actsteer.load_model("smollm2-135m")
    source = read_lines("source", count=args.lines)
    target = read_lines("target", count=args.lines)
    tokens = sum(
        int(b["attention_mask"].sum())
        for group in (source, target)
        for b in batches(tok, group, BATCH_SIZE, MAX_LENGTH, model_device(model))
    )

    def fitter(preset: str, mode: str) -> Callable[[], object]:
        return lambda: actsteer.fit(
            model,
            tok,
            source=source,
            target=target,
            modules=preset,
            mode=mode,
            pooling="mean",
            batch_size=BATCH_SIZE,
            max_length=MAX_LENGTH,
            progress=False,
        )

    jobs: dict[str, Callable[[], object]] = {
        "forward model(**batch)": lambda: forward_passes(model, tok, (target, source), False),
        "forward body": lambda: forward_passes(model, tok, (target, source), True),
    }
    for preset in args.presets:
        for mode in ("independent", "sequential"):
            jobs[f"fit {mode} {preset}"] = fitter(preset, mode)
    jobs["forward body"]()  # warm-up
    seconds: dict[str, list[float]] = {job: [] for job in jobs}
    for r in range(args.rounds):
        busy = []
        for job in rotated(list(jobs), r):
            busy.append(wait_for_quiet())
            seconds[job].append(timed(jobs[job]))
        last = {job: round(v[-1], 1) for job, v in seconds.items()}
        print(
            f"round {r + 1}/{args.rounds} seconds: {last}; others' CPU before each job: "
            f"{max(busy):.0%} max",
            flush=True,
        )

    def per_round(num: str, den: str) -> list[float]:
        return [a / b for a, b in zip(seconds[num], seconds[den], strict=True)]

    rows = []
    verdicts = []
    for preset in args.presets:
        n_modules = len(resolve_modules(model, preset))
        ind, seq = f"fit independent {preset}", f"fit sequential {preset}"
        full, body = "forward model(**batch)", "forward body"
        r_full, r_body = per_round(ind, full), per_round(ind, body)
        r_seq, r_seq_full = per_round(seq, ind), per_round(seq, full)
        rows += [
            [f"{preset} ({n_modules})", "independent ÷ forward model(**batch)", fmt_spread(r_full)],
            [
                f"{preset} ({n_modules})",
                "independent ÷ forward body (no LM head)",
                fmt_spread(r_body),
            ],
            [f"{preset} ({n_modules})", "sequential ÷ independent", fmt_spread(r_seq)],
            [
                f"{preset} ({n_modules})",
                "sequential ÷ forward model(**batch)",
                fmt_spread(r_seq_full),
            ],
        ]
        verdicts.append(
            f"{preset}: independent ÷ forward {statistics.median(r_full):.2f} "
            f"({'met' if statistics.median(r_full) <= TARGET_FIT else 'MISSED'}; ÷ body "
            f"{statistics.median(r_body):.2f}), sequential ÷ independent "
            f"{statistics.median(r_seq):.2f} "
            f"({'met' if statistics.median(r_seq) <= TARGET_SEQ else 'MISSED'})"
        )
    abs_rows = [[job, fmt_spread(v, 1)] for job, v in seconds.items()]

    naive_rows = []
    if args.naive_lines:
        n_src = read_lines("source", count=args.naive_lines)
        n_tgt = read_lines("target", count=args.naive_lines)
        for preset in args.presets:
            t_fwd = timed(lambda: forward_passes(model, tok, (n_tgt, n_src), False))
            t_seq = timed(
                lambda p=preset: actsteer.fit(
                    model,
                    tok,
                    n_src,
                    n_tgt,
                    modules=p,
                    mode="sequential",
                    pooling="mean",
                    progress=False,
                )
            )
            t_naive = timed(lambda p=preset: naive_sequential_fit(model, tok, n_src, n_tgt, p))
            passes = analytic_naive_passes(model, preset)
            naive_rows.append(
                [
                    preset,
                    f"{passes:.1f} source passes + 1 target pass",
                    f"{t_naive:.1f} s = {t_naive / t_fwd:.1f} × forward",
                    f"{t_seq:.1f} s = {t_seq / t_fwd:.1f} × forward",
                    f"{t_naive / t_seq:.1f}",
                ]
            )
            print(f"naive {preset}: {naive_rows[-1]}", flush=True)

    print()
    print("## Fit cost")
    print()
    print(f"- machine: {run.env}")
    print(f"- command: {run.command}")
    print(
        f"- settings: SmolLM2-135M-Instruct float32, Linear-AcT, pooling mean, "
        f"{args.lines}+{args.lines} toxic/neutral lines ({tokens} real tokens), batch size "
        f"{BATCH_SIZE}, max_length {MAX_LENGTH}; {args.rounds} rounds, job order rotated "
        "every round; ratios are per round, then median (min–max)"
    )
    print(f"- wall time: {run.seconds():.0f} s; contention: {contention()}")
    print()
    print(table(["modules", "ratio", "median (min–max)"], rows))
    print()
    print(table(["job", "seconds median (min–max)"], abs_rows))
    if naive_rows:
        print()
        print(
            f"Naive sequential (truncated re-run per module), one run on "
            f"{args.naive_lines}+{args.naive_lines} lines; forward = model(**batch) over them:"
        )
        print()
        header = ["modules", "analytic cost", "naive measured", "library sequential", "naive ÷ seq"]
        print(table(header, naive_rows))
    print()
    print(
        f"Verdict (targets: fit ÷ forward ≤ {TARGET_FIT}, sequential ÷ independent ≤ {TARGET_SEQ}):"
    )
    for line in verdicts:
        print(f"- {line}")


if __name__ == "__main__":
    main()
