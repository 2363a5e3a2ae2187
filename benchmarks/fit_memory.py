"""Peak memory of a fit with pooling "all": bounded by budget_mb, not by the number of texts.

Each configuration runs in a fresh subprocess that loads SmolLM2-135M, optionally fits
Linear-AcT on `modules="layernorms"` with pooling "all" (every real token a sample, subsampled
so the samples of both sets stay within `budget_mb`), and reports its peak resident set size
(resource.getrusage(RUSAGE_SELF).ru_maxrss). Memory does not depend on the machine's load, so
one run per configuration suffices.

  .venv/bin/python benchmarks/fit_memory.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import begin, read_lines, set_threads, table

MiB = 2**20
#: (texts per set, budget_mb); (0, 0): load the model only; (n, 0): plain forward passes
#: over the n+n texts, no fit (the memory any pass over the data needs).
CONFIGS = [(0, 0), (250, 0), (250, 1024), (1000, 1024), (250, 256), (1000, 256)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[f"{n}:{b}" for n, b in CONFIGS],
        help="texts_per_set:budget_mb pairs; 0:0 = load only; N:0 = forward passes only",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_mb() -> float:
    """Peak RSS of this process in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: str, threads: int) -> dict[str, float | int]:
    """Run one configuration in this (fresh) process and describe its memory use."""
    import torch

    import actsteer
    from actsteer.capture import batches, resolve_modules, sample_cap

    set_threads(threads)
    texts, budget = (int(x) for x in spec.split(":"))
    model, tok = actsteer.load_model("smollm2-135m")
    result: dict[str, float | int] = {"texts": texts, "budget_mb": budget}
    result["peak_after_load_mb"] = peak_mb()
    if texts and not budget:
        with torch.inference_mode():
            for name in ("source", "target"):
                for b in batches(tok, read_lines(name, count=texts), 16, 128, model.device):
                    model.model(**b, use_cache=False)
    elif texts:
        source = read_lines("source", count=texts)
        target = read_lines("target", count=texts)
        names = resolve_modules(model, "layernorms")
        width = model.config.hidden_size
        # fit gives each recorded set (source, target) half of budget_mb.
        cap = sample_cap("all", len(names), width, budget / 2)
        for side, group in (("source", source), ("target", target)):
            result[f"{side}_tokens"] = sum(
                int(b["attention_mask"].sum())
                for b in batches(tok, group, 16, 128, torch.device("cpu"))
            )
        result["cap_rows"] = cap
        result["modules"] = len(names)
        result["held_mb"] = sum(
            min(cap, int(result[f"{side}_tokens"])) * len(names) * width * 4 / MiB
            for side in ("source", "target")
        )
        start = time.perf_counter()
        actsteer.fit(
            model,
            tok,
            source=source,
            target=target,
            modules="layernorms",
            pooling="all",
            budget_mb=budget,
            progress=False,
        )
        result["fit_seconds"] = time.perf_counter() - start
    result["peak_mb"] = peak_mb()
    return result


def run_config(spec: str, threads: int) -> dict[str, float | int]:
    """Run one configuration in a fresh interpreter and parse its result line."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), "--child", spec],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"configuration {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.threads)), flush=True)
        return
    run = begin("benchmarks/fit_memory.py", argv, args.threads)
    results = []
    for spec in args.configs:
        results.append(run_config(spec, args.threads))
        print(f"  {spec}: {results[-1]}", flush=True)
    load = next((r["peak_mb"] for r in results if not r["texts"]), results[0]["peak_after_load_mb"])
    forward = next((r["peak_mb"] for r in results if r["texts"] and not r["budget_mb"]), None)
    rows = []
    for r in results:
        if not r["budget_mb"]:
            what = f"forward passes only, {r['texts']}+{r['texts']} texts" if r["texts"] else ""
            rows.append(
                [what or "load model only", "–", "–", "–", "–", f"{r['peak_mb']:.0f}"]
                + [f"{r['peak_mb'] - load:.0f}", "–", "–"]
            )
            continue
        tokens = f"{r['source_tokens']} / {r['target_tokens']}"
        rows.append(
            [
                f"fit, {r['texts']}+{r['texts']} texts",
                f"{r['budget_mb']}",
                tokens,
                f"{r['cap_rows']}",
                f"{r['held_mb']:.0f}",
                f"{r['peak_mb']:.0f}",
                f"{r['peak_mb'] - load:.0f}",
                "–" if forward is None else f"{r['peak_mb'] - forward:.0f}",
                f"{r['fit_seconds']:.0f}",
            ]
        )
    header = [
        "configuration",
        "budget_mb",
        "real tokens source / target",
        "cap rows per module and set",
        "samples held, MiB (both sets)",
        "peak RSS, MiB",
        "peak − load, MiB",
        "peak − forward-only peak, MiB",
        "fit s",
    ]
    print()
    print("## Fit memory")
    print()
    print(f"- machine: {run.env}")
    print(f"- command: {run.command}")
    print(
        "- settings: SmolLM2-135M-Instruct float32, Linear-AcT, modules=layernorms, "
        "pooling all, batch size 16, max_length 128; one fresh subprocess per row; "
        "peak = ru_maxrss"
    )
    print(f"- wall time: {run.seconds():.0f} s")
    print()
    print(table(header, rows))
    print()
    base = load if forward is None else forward
    for budget in sorted({r["budget_mb"] for r in results if r["budget_mb"]}):
        over = [r["peak_mb"] - base for r in results if r["budget_mb"] == budget]
        print(
            f"- budget_mb {budget}: peak − {'load' if forward is None else 'forward-only'} peak "
            f"≤ {max(over):.0f} MiB = {max(over) / budget:.2f} × budget_mb"
        )


if __name__ == "__main__":
    main()
