"""Start-up time of `import actsteer`, `actsteer --help` and `actsteer methods`, before and
after a change of the library, side by side in one run.

Each command runs in a fresh interpreter (this one's), importing actsteer from this checkout
(after) or from a git worktree of --before, in turn: every repetition runs each command once
per revision, the order alternating, so both see the same load. Reported per command and
revision: the median wall time and the median CPU time (user + sys of the child, less sensitive
to a busy machine) over --repeats, and after ÷ before.

  git worktree add /tmp/actsteer-before 55914bf^   # the commit before the lazy imports
  .venv/bin/python benchmarks/startup.py --before /tmp/actsteer-before --repeats 7
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "import actsteer": "import actsteer",
    "actsteer --help": "from actsteer.cli import app; app(['--help'], prog_name='actsteer')",
    "actsteer methods": "from actsteer.cli import app; app(['methods'], prog_name='actsteer')",
}


def run_once(tree: Path, code: str) -> tuple[float, float]:
    """Wall and CPU seconds of one fresh interpreter running `code` against `tree`'s actsteer."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{code!r} in {tree} failed: {done.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the old revision")
    parser.add_argument("--after", type=Path, default=ROOT, help="checkout of the new revision")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for code in COMMANDS.values():  # warm the file cache once per tree
        for tree in trees.values():
            run_once(tree, code)
    for repeat in range(args.repeats):
        order = list(trees.items()) if repeat % 2 == 0 else list(trees.items())[::-1]
        for name, code in COMMANDS.items():
            for revision, tree in order:
                times.setdefault((name, revision), []).append(run_once(tree, code))
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    print(f"{args.repeats} repeats, medians; before = {trees['before']}, after = {trees['after']}")
    print(
        "| command | before wall s | after wall s | after ÷ before | before CPU s | after CPU s |"
    )
    print("|---|---|---|---|---|---|")
    for name in COMMANDS:
        b_wall = statistics.median(w for w, _ in times[(name, "before")])
        a_wall = statistics.median(w for w, _ in times[(name, "after")])
        b_cpu = statistics.median(c for _, c in times[(name, "before")])
        a_cpu = statistics.median(c for _, c in times[(name, "after")])
        print(
            f"| `{name}` | {b_wall:.2f} | {a_wall:.2f} | {a_wall / b_wall:.3f} | "
            f"{b_cpu:.2f} | {a_cpu:.2f} |"
        )


if __name__ == "__main__":
    main()
