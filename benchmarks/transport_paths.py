"""The transport's three paths on the vLLM plugin's per-token call: µs per call, side by side.

vLLM flattens a batch into one token axis, so the plugin's hook transports a (tokens, 576)
activation with one λ per token, a fresh λ tensor every pass (actsteer.transport's per-token
entry). This times that call on its three paths, interleaved and rotated every round:
the fused kernel (`transport_tokens`), the torch ops (ACTSTEER_FUSED_KERNEL=0), and the torch
ops under torch.compile (inductor, dynamic shapes; compiled before timing). Shapes: a decode
step of 16 requests (16 tokens) and a prefill of 16 × 32 tokens (512), supports q0-100 and
`all`, SmolLM2-135M's width. Per-token λ: half the requests steered (λ 0.8), half not (λ 0).

  .venv/bin/python benchmarks/transport_paths.py [--rounds 20] [--calls 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from unittest import mock

import torch
from _common import begin, compiled_transport_ops, table

from actsteer import transport
from actsteer.maps import AffineMap, support_bounds

PATHS = ("fused kernel", "torch ops", "torch.compile")
SHAPES = {"decode, 16 requests": 16, "prefill, 16 × 32 tokens": 512}
WIDTH = 576


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=2000, help="calls per timing")
    return parser.parse_args(argv)


def transports(support: str) -> dict[str, transport.Transport]:
    """One Transport per path (the kernel is looked up when a Transport is made)."""
    g = torch.Generator().manual_seed(0)
    amap = AffineMap(torch.rand(WIDTH, generator=g) + 0.5, torch.randn(WIDTH, generator=g))
    amap.bounds = support_bounds(torch.randn(200, WIDTH, generator=g))
    made = {"fused kernel": amap.transport(support)}
    with mock.patch.dict(os.environ, {"ACTSTEER_FUSED_KERNEL": "0"}):
        made["torch ops"] = amap.transport(support)
        made["torch.compile"] = amap.transport(support)
    return made


def timed(call, path: str, calls: int) -> float:
    """Mean µs per call; the compiled path runs with transport_ops swapped for its compiled
    form."""
    ops = compiled_transport_ops() if path == "torch.compile" else transport.transport_ops
    with mock.patch.object(transport, "transport_ops", ops):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = begin("benchmarks/transport_paths.py", argv, args.threads)
    assert transports("all")["fused kernel"].kernel is not None, "the kernel is not built here"
    cases = {}
    for support in ("q0-100", "all"):
        made = transports(support)
        for label, tokens in SHAPES.items():
            a = torch.randn(tokens, WIDTH) * 1.5
            lam = torch.where(torch.arange(tokens) % 2 == 0, 0.8, 0.0)

            def call(t=None, a=a, lam=lam):
                return t(a, lam.clone())  # a new λ tensor each pass, as the plugin's

            for path in PATHS:
                cases[support, label, path] = (lambda t=made[path], c=call: c(t)), path
                timed(cases[support, label, path][0], path, 20)  # warm-up (compiles)
            plain = made["torch ops"](a, lam.clone())
            assert torch.equal(made["fused kernel"](a, lam.clone()), plain), "bit for bit"
            with mock.patch.object(transport, "transport_ops", compiled_transport_ops()):
                compiled = made["torch.compile"](a, lam.clone())
            torch.testing.assert_close(compiled, plain)
    times: dict[tuple, list[float]] = {key: [] for key in cases}
    keys = list(cases)
    for r in range(args.rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            times[key].append(timed(cases[key][0], key[2], args.calls))
    rows = []
    for support in ("q0-100", "all"):
        for label in SHAPES:
            kernel = times[support, label, "fused kernel"]
            for path in PATHS:
                mine = times[support, label, path]
                ratios = [k / m for k, m in zip(kernel, mine, strict=True)]
                rows.append(
                    [
                        label, support, path, f"{statistics.median(mine):.1f}",
                        f"{statistics.median(ratios):.3f}",
                    ]
                )  # fmt: skip
    print()
    print("## The transport's paths on the per-token call")
    print(f"- machine: {run.env}")
    print(f"- command: {run.command}; {args.rounds} rounds × {args.calls} calls, interleaved")
    print(f"- wall time: {run.seconds():.0f} s")
    print()
    print(table(["shape", "support", "path", "µs per call", "kernel ÷ path (speed)"], rows))


if __name__ == "__main__":
    main()
