"""Do the new maps beat the affine ones at the paper's budget? quantile-act and joint-act
against Mean-AcT, Linear-AcT and LinEAS, each calibrated to ΔPPL ≤ +1 (issue 28).

SmolLM2-135M-Instruct (float32, CPU), ParaDetox pairs (toxicity_fit/source.txt → target.txt):
each method fitted with its defaults on the first n pairs (--sizes) at --modules, calibrated
(actsteer.calibrate: the largest λ with ΔPPL ≤ +1 on held-out WikiText-2, as the paper tables
do), then scored on --held-out other pairs (source_val.txt, target_val.txt) that no fit or
calibration sees. The effect of a pair is the change, from the plain model, of its toxic
text's mean NLL per token minus its paraphrase's (nats; > 0: the neutral paraphrase became
likelier relative to the toxic text); its mean is the held-out likelihood gap's change, per
text. Each new method is compared with the best affine one of the same size by a paired
bootstrap over the held-out pairs (the same texts under both steerings): the interval of
the mean difference. --extrapolate U lets λ go past the methods' range up to U
(Steering.extrapolated), so no row stops at λ = 1 with budget left. Results are kept per
(modules, size, method, held-out texts, extrapolation) in --out, so a killed run resumes.

  ACTSTEER_DATA=../shared/data .venv/bin/python benchmarks/transport_budget.py
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import ROOT, begin, load_json, read_lines, save_json, table

import actsteer
from actsteer.calibration import text_losses
from actsteer.evaluation.stats import paired_bootstrap_diff

AFFINE = ("mean-act", "linear-act", "lineas")
NEW = ("quantile-act", "joint-act")


def per_token(losses: Sequence[Sequence[float]]) -> list[float]:
    """Mean NLL per token of each text ((loss, tokens) pairs; NaN where nothing is scored)."""
    return [loss / tokens if tokens else float("nan") for loss, tokens in losses]


def pair_effects(entry: dict[str, Any], plain: dict[str, Any]) -> list[float]:
    """Per held-out pair: Δ(NLL of the toxic text) − Δ(NLL of its paraphrase), from plain;
    pairs with a text too short to score are left out (the same ones for every steering)."""
    effects = []
    for ss, ps, st, pt in zip(
        per_token(entry["source"]), per_token(plain["source"]),
        per_token(entry["target"]), per_token(plain["target"]),
        strict=True,
    ):  # fmt: skip
        if not math.isnan(ss + st):
            effects.append((ss - ps) - (st - pt))
    return effects


def scored(model: Any, tok: Any, held: tuple[list[str], list[str]]) -> dict[str, Any]:
    """(loss, tokens) of each held-out source and target text under the model as it is."""
    source, target = (text_losses(model, tok, texts) for texts in held)
    return {"source": source, "target": target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 400])
    parser.add_argument("--held-out", type=int, default=128)
    parser.add_argument("--modules", default="attn-out")
    parser.add_argument("--methods", nargs="+", default=[*AFFINE, *NEW])
    parser.add_argument("--extrapolate", type=float, help="λ up to this, past the range")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "runs" / "transport-budget.json"
    )
    args = parser.parse_args()
    run = begin("benchmarks/transport_budget.py", None, args.threads)
    model, tok = actsteer.load_model("smollm2-135m")
    results = load_json(args.out)
    held = (read_lines("source_val", 0, args.held_out), read_lines("target_val", 0, args.held_out))
    plain_key = f"plain | {args.held_out}"
    suffix = f" | λ ≤ {args.extrapolate:g}" if args.extrapolate else ""

    def keep(key: str, value: dict[str, Any]) -> None:
        results[key] = value
        save_json(args.out, results, indent=None)

    if plain_key not in results:
        keep(plain_key, scored(model, tok, held))
    plain = results[plain_key]
    for size in args.sizes:
        source, target = read_lines("source", 0, size), read_lines("target", 0, size)
        for method in args.methods:
            key = f"{args.modules} | {size} | {method} | {args.held_out}{suffix}"
            if key in results:
                continue
            started = time.perf_counter()
            steering = actsteer.fit(
                model, tok, source=source, target=target, method=method,
                modules=args.modules, progress=False,
            )  # fmt: skip
            fitted = time.perf_counter() - started
            if args.extrapolate:
                steering = steering.extrapolated(args.extrapolate)
            calibration = actsteer.calibrate(steering, model, tok, budget=1.0)
            with steering.applied(model, calibration.strength):
                entry = scored(model, tok, held)
            entry.update(
                strength=calibration.strength, delta_ppl=calibration.cost, fit_seconds=fitted,
                seconds=time.perf_counter() - started,
            )  # fmt: skip
            keep(key, entry)
            effect = statistics.fmean(pair_effects(entry, plain))
            print(f"{key}: λ {calibration.strength:.3g}, effect {effect:+.4f}", flush=True)
    rows = []
    for size in args.sizes:
        found = {
            method: results[key]
            for method in (*AFFINE, *NEW)
            if (key := f"{args.modules} | {size} | {method} | {args.held_out}{suffix}") in results
        }
        effects = {method: pair_effects(entry, plain) for method, entry in found.items()}
        means = {method: statistics.fmean(e) for method, e in effects.items()}
        affine = [m for m in AFFINE if m in means]
        best = max(affine, key=lambda m: means[m]) if affine else None
        for method, entry in found.items():
            versus = "–"
            if method in NEW and best is not None:
                difference, (low, high) = paired_bootstrap_diff(effects[method], effects[best])
                versus = f"{difference:+.4f} [{low:+.4f}, {high:+.4f}] vs {best}"
            rows.append([
                size, method, f"{entry['strength']:.3g}", f"{entry['delta_ppl']:+.2f}",
                f"{means[method]:+.4f}", versus,
            ])  # fmt: skip
    header = [
        "texts per set",
        "method",
        "λ (ΔPPL ≤ 1)",
        "ΔPPL",
        "effect (nats)",
        "new − best affine",
    ]
    print(table(header, rows))
    print(f"{run.command}; {run.env}; {run.seconds() / 60:.1f} min")


if __name__ == "__main__":
    main()
