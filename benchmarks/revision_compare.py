"""Hooks and folding before and after a change of the library, side by side in one run.

Two worker processes load the same model and fit the same steering: one imports actsteer from
this checkout, the other from a git worktree of --before (default: the commit before the
redesign of issue 13). The parent runs them in turn, never both at once, for --rounds rounds
(the order alternating), and each worker times in its round, interleaved and rotated:

  decode step  one cached decode step (batch 1 and 8), unsteered / support q0-100 / all (λ = 1,
               Linear-AcT on all 61 norm outputs of SmolLM2-135M)
  generate     greedy `model.generate` of --new-tokens tokens (--generate-reps interleaved
               repetitions, their median), the same variants, plus the
               folded copy (support all, λ = 1; the 60 maps other than the final norm's,
               whose shift would need a bias on the LM head) and the time `Steering.fold` takes

Each worker round gives one throughput ratio per variant (÷ its own unsteered run in the same
round): the hook overhead of each revision, measured under the same conditions as the other's.
Reported: the median and min–max of those ratios per revision, and the median of the per-round
differences (after − before).

  .venv/bin/python benchmarks/revision_compare.py --rounds 12
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "72775fa"  # main before the redesign of issue 13
MODULES = "layernorms"
BATCHES = (1, 8)
SUPPORTS = ("q0-100", "all")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=BEFORE, help="the revision to compare against")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--decode-reps", type=int, default=20)
    parser.add_argument("--generate-reps", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# worker: runs with either revision's actsteer on sys.path, uses only the API both have


def data_lines(name: str, start: int, count: int) -> list[str]:
    folder = Path(os.environ.get("ACTSTEER_DATA", ROOT.parent / "shared" / "data"))
    lines = [x for x in (folder / "toxicity_fit" / f"{name}.txt").read_text().splitlines() if x]
    return lines[start : start + count]


def worker(args: argparse.Namespace) -> None:
    import torch

    import actsteer

    torch.set_num_threads(args.threads)
    model, tok = actsteer.load_model("smollm2-135m")
    steering = actsteer.fit(
        model, tok, source=data_lines("source", 0, 64), target=data_lines("target", 0, 64),
        modules=MODULES, progress=False,
    )  # fmt: skip
    prompts = {b: dict(tok(data_lines("source", 1000, b), return_tensors="pt", padding=True))
               for b in BATCHES}  # fmt: skip
    keyword = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip

    def steered(support: str | None):
        from contextlib import nullcontext

        return nullcontext() if support is None else steering.applied(model, 1.0, support)

    decoders = {}
    for b, enc in prompts.items():
        with torch.inference_mode():
            out = model(**enc, use_cache=True)
        cache = getattr(out, keyword)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([enc["attention_mask"], torch.ones(b, 1, dtype=torch.long)], dim=1)

        def decode(token=token, mask=mask, cache=cache) -> None:
            model(input_ids=token, attention_mask=mask, use_cache=True, **{keyword: cache})
            cache.crop(-1)

        decoders[b] = decode
    # the final norm's shift feeds the LM head, which has no bias: fold the other 60 maps
    foldable = dataclasses.replace(
        steering, maps={n: m for n, m in steering.maps.items() if n != "model.norm"}
    )
    folded = foldable.fold(copy.deepcopy(model), 1.0, support="all")
    variants = (None, *SUPPORTS)
    print(json.dumps({"ready": True}), flush=True)
    for round_index, _ in enumerate(sys.stdin):
        result: dict[str, float] = {}
        order = variants[round_index % 3 :] + variants[: round_index % 3]
        with torch.inference_mode():
            for b, decode in decoders.items():
                times: dict[str | None, list[float]] = {v: [] for v in variants}
                for _ in range(args.decode_reps):
                    for support in order:
                        with steered(support):
                            t0 = time.perf_counter()
                            decode()
                            times[support].append(time.perf_counter() - t0)
                base = statistics.median(times[None])
                for support in SUPPORTS:
                    result[f"decode step, batch {b}, {support}"] = base / statistics.median(
                        times[support]
                    )
                seconds: dict[str, list[float]] = {str(n): [] for n in (*order, "folded")}
                for _ in range(args.generate_reps):
                    for name in (*order, "folded"):
                        runner = folded if name == "folded" else model
                        with steered(None if name in (None, "folded") else name):
                            t0 = time.perf_counter()
                            runner.generate(**prompts[b], **settings)
                            seconds[str(name)].append(time.perf_counter() - t0)
                base = statistics.median(seconds["None"])
                for name in (*SUPPORTS, "folded"):
                    result[f"generate, batch {b}, {name}"] = base / statistics.median(seconds[name])
        fresh = copy.deepcopy(model)
        start = time.perf_counter()
        foldable.fold(fresh, 1.0, support="all")
        result["fold, seconds"] = time.perf_counter() - start
        print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# parent


def spawn(src: Path, args: argparse.Namespace) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [
        sys.executable, __file__, "--worker", str(src), "--threads", str(args.threads),
        "--new-tokens", str(args.new_tokens), "--decode-reps", str(args.decode_reps),
        "--generate-reps", str(args.generate_reps),
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, cwd=tempfile.gettempdir())  # fmt: skip
    ready = json.loads(process.stdout.readline())
    assert ready == {"ready": True}, ready
    return process


def ask(process: subprocess.Popen) -> dict[str, float]:
    process.stdin.write("round\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, text=True,
                           capture_output=True).stdout.strip()  # fmt: skip
    print(f"after: {revision}{'-dirty' if dirty else ''}, before: {args.before}, "
          f"{args.rounds} rounds, {args.threads} threads")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.before], cwd=ROOT,
                       check=True, capture_output=True)  # fmt: skip
        try:
            workers = {"before": spawn(tree / "src", args), "after": spawn(ROOT / "src", args)}
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in workers}
            for r in range(args.rounds):
                for name in list(workers)[:: 1 if r % 2 else -1]:
                    rounds[name].append(ask(workers[name]))
                print(f"  round {r + 1}/{args.rounds} done", flush=True)
            for process in workers.values():
                process.stdin.close()
                process.wait()
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           capture_output=True)  # fmt: skip
    print("\n| measure (÷ unsteered; fold: seconds) | before | after | after − before |")
    print("|---|---|---|---|")
    for key in rounds["after"][0]:
        before = [r[key] for r in rounds["before"]]
        after = [r[key] for r in rounds["after"]]
        delta = statistics.median(a - b for a, b in zip(after, before, strict=True))
        print(f"| {key} | {summary(before)} | {summary(after)} | {delta:+.3f} |")


if __name__ == "__main__":
    main()
