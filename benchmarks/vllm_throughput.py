"""vLLM throughput with every request steered ÷ unsteered, interleaved.

One vLLM engine with actsteer's plugin (--mode eager or compiled: vLLM's default compilation)
serves a Linear-AcT steering fitted on every norm output of SmolLM2-135M (`layernorms`: 61
modules, support q0-100). Each round generates the same batch with no request steered and with
every request steered at its own λ (0.25, 0.5, 0.75, 1 in turn) (--gate: the steering has a
token gate on every module, fitted on the same sentences); --plain adds two engines without
the plugin, compiled and eager, each generating the batch too. The order of the batches
rotates from round to round; throughput is generated tokens per second of `llm.generate`,
each ratio the median of the rounds' ratios. Holds /tmp/actsteer-bench.lock while timing.

    .venv-vllm/bin/python benchmarks/vllm_throughput.py [--mode compiled] [--plain]
        [--requests 32] [--tokens 64] [--rounds 8]

The defaults make each measurement about 11 s: with 16 × 32 (2 s) single rounds swung ±15% on a
quiet machine and the median of 12 rounds moved by 5% between runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from importlib.resources import files
from pathlib import Path

from _common import bench_lock, contention, machine, wait_for_quiet

PROMPTS = [
    "The weather today is",
    "My favourite hobby is",
    "Yesterday I went to the",
    "The best way to spend a Sunday is",
    "In the morning I usually",
    "The city council decided to",
    "Her new book is about",
    "The recipe calls for",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--gate", action="store_true", help="the steering with a token gate (issue 29)"
    )
    parser.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    parser.add_argument(
        "--plain", action="store_true", help="also time engines without the plugin (issue 27)"
    )
    args = parser.parse_args()
    print(machine())

    import vllm

    import actsteer
    from actsteer.models import _cached_alias

    model, tok = actsteer.load_model("smollm2-135m")
    data = files("actsteer").joinpath("data")
    neutral = data.joinpath("neutral.txt").read_text().splitlines()[:16]
    football = data.joinpath("football.txt").read_text().splitlines()[:16]
    steering = actsteer.fit(
        model, tok, source=neutral, target=football, modules="layernorms", progress=False,
        gate="token" if args.gate else None,
    )  # fmt: skip
    del model
    path = Path(tempfile.mkdtemp()) / "norms.safetensors"
    steering.save(path)

    from actsteer.integrations.vllm import engine_args

    def engine(mode: str, steered: bool) -> vllm.LLM:
        plugin = engine_args({"norms": path}, compiled=mode == "compiled") if steered else {}
        execution = {} if steered else {"enforce_eager": mode == "eager"}
        return vllm.LLM(
            model=str(_cached_alias("smollm2-135m")),
            dtype="float32",
            max_model_len=256,
            gpu_memory_utilization=0.1,
            **plugin,
            **execution,
        )

    engines = {"actsteer": engine(args.mode, True)}
    if args.plain:
        engines |= {
            "plain compiled": engine("compiled", False),
            "plain eager": engine("eager", False),
        }
    prompts = [
        {"prompt_token_ids": tok(PROMPTS[i % len(PROMPTS)]).input_ids} for i in range(args.requests)
    ]
    lams = [0.25, 0.5, 0.75, 1.0]

    def params(steered: bool) -> list:
        return [
            vllm.SamplingParams(
                temperature=0,
                max_tokens=args.tokens,
                min_tokens=args.tokens,
                extra_args={"actsteer": {"norms": lams[i % 4]}} if steered else None,
            )
            for i in range(args.requests)
        ]

    #: what each round times: (label, engine, steered requests)
    batches = [("unsteered", "actsteer", False), ("steered", "actsteer", True)]
    batches += [(name, name, False) for name in engines if name != "actsteer"]

    def timed(name: str, steered: bool) -> float:
        wait_for_quiet()
        start = time.perf_counter()
        outputs = engines[name].generate(prompts, params(steered), use_tqdm=False)
        seconds = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outputs) / seconds

    for _, name, steered in batches:  # warm-up
        timed(name, steered)
    speeds: dict[str, list[float]] = {label: [] for label, _, _ in batches}
    with bench_lock():
        for r in range(args.rounds):
            turn = batches[r % len(batches) :] + batches[: r % len(batches)]
            for label, name, steered in turn:
                speeds[label].append(timed(name, steered))
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items()))
    print(f"vllm {vllm.__version__}; {contention()}")

    def ratio(top: str, bottom: str) -> str:
        ratios = [a / b for a, b in zip(speeds[top], speeds[bottom], strict=True)]
        return (
            f"{top} ÷ {bottom} = {statistics.median(ratios):.3f} (median of {args.rounds} "
            f"rounds; min {min(ratios):.3f}, max {max(ratios):.3f})"
        )

    medians = ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in speeds.items())
    print(
        f"{args.requests} requests × {args.tokens} tokens, {len(steering.maps)} norm outputs "
        f"steered, actsteer engine {args.mode}; tok/s: {medians}"
    )
    print(ratio("steered", "unsteered"))
    if args.plain:
        print(ratio("steered", f"plain {args.mode}"))
        print(ratio("unsteered", f"plain {args.mode}"))
        print(ratio("plain compiled", "plain eager"))


if __name__ == "__main__":
    main()
