"""LinEAS fit: wall time, peak memory, loss curve, and held-out end-to-end W2 against Linear-AcT.

SmolLM2-135M-Instruct (float32, CPU), modules "post-attn-ln" (30), 32 toxic → 32 neutral lines
of $ACTSTEER_DATA/toxicity_fit (source.txt, target.txt), LinEAS at its default settings unless
told otherwise. Reported:
- fit wall time (recording included) of LinEAS, and of independent Linear-AcT on the same texts;
- peak memory: ru_maxrss of the process after loading and after the fit, and the peak RSS seen
  during the fit (psutil, sampled every 50 ms) above the RSS at its start;
- the loss curve (the steering's info.data["training"]["loss_curve"]);
- the end-to-end distance (LinEAS's loss: Σ modules Σ units W2² between the pooled activations
  of source texts through the steered model and of target texts on the plain model) on 128
  held-out lines each (source_val.txt, target_val.txt) and on the 32+32 fitted lines, for the
  plain model, Linear-AcT (support all and q0-100) and LinEAS.

  .venv/bin/python benchmarks/lineas_fit.py
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
from typing import Any

import psutil
from _common import begin, read_lines, table

import actsteer
from actsteer.capture import record
from actsteer.lineas import end_to_end_distance
from actsteer.modes import EndToEnd

MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lines", type=int, default=32, help="fitted toxic and neutral lines")
    parser.add_argument("--held-out", type=int, default=128, help="held-out lines each")
    parser.add_argument("--modules", default="post-attn-ln")
    parser.add_argument("--steps", type=int, default=None, help="default: LinEAS's")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--sparsity", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="default: fit's")
    parser.add_argument("--init", default=None)
    return parser.parse_args(argv)


def peak_mib() -> float:
    """Peak RSS of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """The highest RSS seen while running, sampled every `every` seconds."""

    def __init__(self, every: float = 0.05) -> None:
        self.process = psutil.Process()
        self.every = every
        self.start = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(self.every):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.thread.join()


def distance(model: Any, tok: Any, steering: Any, support: str, source, target) -> float:
    names = list(steering.maps)
    plain = record(model, tok, target, names, progress=False)
    if steering is None or support == "plain":
        steered = record(model, tok, source, names, progress=False)
    else:
        with steering.applied(model, 1.0, support):
            steered = record(model, tok, source, names, progress=False)
    return end_to_end_distance(steered, plain)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = begin("benchmarks/lineas_fit.py", argv, args.threads)
    model, tok = actsteer.load_model("smollm2-135m")
    after_load = peak_mib()
    source, target = read_lines("source", count=args.lines), read_lines("target", count=args.lines)
    held_source = read_lines("source_val", count=args.held_out)
    held_target = read_lines("target_val", count=args.held_out)
    settings = EndToEnd(**{
        key: value
        for key, value in dict(
            training_steps=args.steps, learning_rate=args.learning_rate, sparsity=args.sparsity,
            init=args.init,
        ).items()
        if value is not None
    })  # fmt: skip
    extra = {} if args.batch_size is None else {"batch_size": args.batch_size}
    with RssSampler() as rss:
        start = time.perf_counter()
        ours = actsteer.fit(
            model, tok, source=source, target=target, modules=args.modules, method="lineas",
            mode=settings, **extra,
        )  # fmt: skip
        lineas_s = time.perf_counter() - start
    after_fit = peak_mib()
    start = time.perf_counter()
    act = actsteer.fit(model, tok, source=source, target=target, modules=args.modules, **extra)
    act_s = time.perf_counter() - start
    training = ours.info.data["training"]
    print(f"LinEAS settings: {training | {'loss_curve': '…'}}")
    print(
        f"\nfit wall time: LinEAS {lineas_s:.1f} s, Linear-AcT {act_s:.1f} s "
        f"({len(ours.maps)} modules, {len(source)}+{len(target)} lines)"
    )
    print(
        f"peak memory: ru_maxrss {after_load:.0f} MiB after load → {after_fit:.0f} MiB after "
        f"the LinEAS fit (+{after_fit - after_load:.0f}); RSS during the fit peaked "
        f"{(rss.peak - rss.start) / MiB:.0f} MiB above its start ({rss.start / MiB:.0f} MiB)"
    )
    curve = training["loss_curve"]
    print("\nloss curve (step: loss):")
    print(", ".join(f"{int(step)}: {loss:.1f}" for step, loss in curve))
    print(
        f"units touched: {training['units_touched']} of {training['units']} "
        f"({training['modules_touched']} of {len(ours.maps)} modules)"
    )
    rows = []
    for name, steering, support in (
        ("plain model", act, "plain"),
        ("Linear-AcT, support all", act, "all"),
        ("Linear-AcT, support q0-100", act, "q0-100"),
        ("LinEAS, support all", ours, "all"),
    ):
        held = distance(model, tok, steering, support, held_source, held_target)
        fitted = distance(model, tok, steering, support, source, target)
        rows.append([name, f"{held:.1f}", f"{fitted:.1f}"])
    print()
    print(
        table(
            ["steering", f"held-out W2 ({len(held_source)}+{len(held_target)})", "fitted W2"],
            rows,
        )
    )
    print(f"\ncommand: {run.command}, {run.seconds():.0f} s in all")


if __name__ == "__main__":
    main()
