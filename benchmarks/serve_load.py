"""Load test of `actsteer serve` on SmolLM2-135M over loopback: tokens/s and latency.

A real uvicorn server (in this process, on 127.0.0.1) and real `openai` clients in threads.
Variants, interleaved per round (rotated order), each a fixed number of greedy requests under a
time limit: the batching server with 1, 4 and 16 concurrent clients, on a mixed workload
(requests cycling over no steering, one steering at λ 0.5 or 1, and two composed) and on an
all-unsteered one; and one-at-a-time serving (max batch 1) of the mixed workload with 16
clients. Reported: medians over rounds of tokens/s and p50/p95 request latency, and per-round
ratios: batched ÷ one-at-a-time throughput at 16 clients (target ≥ 3) and mixed ÷ unsteered
(target ≥ 0.95). Creates /tmp/actsteer-bench.lock while it times.

    .venv/bin/python benchmarks/serve_load.py [--rounds 3] [--requests 32] [--tokens 32]
        [--clients 1 4 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import begin, bench_lock, contention, fmt_spread, rotated, table, wait_for_quiet  # noqa: E402

import actsteer  # noqa: E402
from actsteer.serving.app import Server  # noqa: E402
from actsteer.texts import package_texts  # noqa: E402

PROMPTS = [
    "The weather today is",
    "My favourite hobby is",
    "Yesterday I went to the",
    "The best way to spend a Sunday is",
    "In the morning I usually",
    "The city council decided to",
    "Her new book is about",
    "The most important thing in life is",
]
MIXED = [
    None,
    {"football": 0.5},
    {"football": 1.0},
    {"neutral": 1.0},
    {"football": 0.5, "neutral": 1.0},
]


@contextmanager
def serving(server: Server, port: int):
    config = uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning")
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    while not runner.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        runner.should_exit = True
        thread.join()


def load(base: str, clients: int, requests: int, tokens: int, mixed: bool, limit: float) -> dict:
    """Send `requests` greedy completions from `clients` threads; tokens/s and latencies."""
    api = OpenAI(base_url=base, api_key="-", max_retries=0, timeout=limit)
    deadline = time.monotonic() + limit

    def one(i: int) -> tuple[int, float]:
        if time.monotonic() > deadline:
            return 0, float("nan")
        steering = MIXED[i % len(MIXED)] if mixed else None
        start = time.perf_counter()
        response = api.completions.create(
            model="smollm2-135m", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=tokens,
            temperature=0, extra_body={} if steering is None else {"steering": steering},
        )  # fmt: skip
        return response.usage.completion_tokens, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(t for n, t in results if n)
    if len(latencies) < requests:
        raise SystemExit(f"time limit of {limit:g} s hit: {len(latencies)}/{requests} requests")
    return {
        "tok/s": sum(n for n, _ in results) / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of each request")
    parser.add_argument("--limit", type=float, default=300.0, help="seconds per measurement")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1, 4, 16],
        help="client counts of the batching server (one-at-a-time serving runs with 16 clients "
        "when 16 is among them)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    run = begin("benchmarks/serve_load.py", argv, args.threads)

    model, tok = actsteer.load_model("smollm2-135m")
    neutral, football = package_texts("neutral"), package_texts("football")
    fit = dict(modules="post-attn-ln", progress=False)
    steerings = {
        "football": actsteer.fit(model, tok, neutral[:32], football[:32], **fit),
        "neutral": actsteer.fit(model, tok, football[:32], neutral[:32], **fit),
    }
    variants = {f"batched, {c} clients, {w}": (16, c, w == "mixed")
                for c in args.clients for w in ("mixed", "unsteered")}  # fmt: skip
    if 16 in args.clients:
        variants["one at a time, 16 clients, mixed"] = (1, 16, True)
    results: dict[str, list[dict]] = {name: [] for name in variants}
    with bench_lock():
        for r in range(args.rounds):
            for name in rotated(list(variants), r):
                max_batch, clients, mixed = variants[name]
                server = Server(model, tok, steerings, "smollm2-135m", max_batch=max_batch)
                with serving(server, args.port) as base:
                    load(base, 1, 2, 4, mixed, args.limit)  # warm-up (kernel, first shapes)
                    wait_for_quiet()
                    result = load(base, clients, args.requests, args.tokens, mixed, args.limit)
                results[name].append(result)
                print(f"round {r}: {name}: {result['tok/s']:.1f} tok/s, p50 {result['p50']:.2f} s, "
                      f"p95 {result['p95']:.2f} s", flush=True)  # fmt: skip

    rows = [
        [name, fmt_spread([x["tok/s"] for x in rs], 1), fmt_spread([x["p50"] for x in rs], 2),
         fmt_spread([x["p95"] for x in rs], 2)]
        for name, rs in results.items()
    ]  # fmt: skip
    print(table(["variant", "tokens/s", "p50 latency (s)", "p95 latency (s)"], rows))

    def ratio(a: str, b: str) -> str:
        per_round = [x["tok/s"] / y["tok/s"] for x, y in zip(results[a], results[b], strict=True)]
        return fmt_spread(per_round)

    if 16 in args.clients:
        print(
            f"batched ÷ one at a time, 16 clients, mixed: "
            f"{ratio('batched, 16 clients, mixed', 'one at a time, 16 clients, mixed')} "
            "(target ≥ 3)"
        )
    for c in args.clients:
        mixed, plain = f"batched, {c} clients, mixed", f"batched, {c} clients, unsteered"
        print(f"mixed ÷ unsteered, {c} clients: {ratio(mixed, plain)} (target ≥ 0.95)")
    print(f"{args.requests} requests × {args.tokens} tokens per measurement; {contention()}")
    print(f"command: {run.command}; {run.seconds():.0f} s")


if __name__ == "__main__":
    main()
