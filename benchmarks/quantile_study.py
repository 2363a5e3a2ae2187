"""How many knots, how much shrinkage, what rank? quantile-act and joint-act against the affine
maps on unseen texts (issue 28 §1–2), by held-out W2 per unit and sliced.

SmolLM2-135M-Instruct (float32, CPU), ParaDetox pairs (toxicity_fit/source.txt → target.txt),
fitted on --sizes texts per set (the first lines), measured on --held-out others per set
(source_val.txt, target_val.txt), at the modules of --modules (each fit's modules=). Every map is
estimated from one recording of the fit texts (pooling mean, as fit does in mode
independent), so the variants differ only in the estimator: Linear-AcT, Mean-AcT and
quantile-act at K knots placed at the extremes or the centres (`quantile_levels`) with
shrinkage prior P (knot targets α y + (1 − α)(ω x + β), α = n/(n + P)), and joint-act at rank
r with or without Ledoit–Wolf shrinkage or cross-fitting; and Linear-AcT and joint-act fitted
in mode sequential, and LinEAS. The figures are the end-to-end distance (LinEAS's
loss: Σ modules Σ units W2² between pooled activations of the held-out source texts through
the steered model at λ = 1 with support q0-100, except "…, support all" and the joint maps
not named "support q0-100" (support all) and the fitted ones (their default), and of the
held-out target texts
on the plain model) and the sliced distance (Σ modules, the mean W2² over 256 fixed random
directions: what a joint map should move and a per-unit one need not), each divided by the
same distance unsteered (< 1: closer).
Results are kept per (modules, size, variant) in --out, so a killed run resumes.

  ACTSTEER_DATA=../shared/data .venv/bin/python benchmarks/quantile_study.py
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from _common import ROOT, begin, load_json, read_lines, save_json, table

import actsteer
from actsteer.capture import record
from actsteer.lineas import end_to_end_distance
from actsteer.maps import couple, support_bounds
from actsteer.methods import get_method
from actsteer.methods.joint_act import fit_joint
from actsteer.methods.quantile_act import fit_quantile

KNOTS = (4, 16, 64)
PRIORS = (0.0, 32.0)
LEVELS = ("extremes",)  # "centres" ran worse at 32 texts (results kept in --out)
RANKS = (1, 4, 16)
#: Steerings fitted by actsteer.fit itself, at their defaults: name → fit options (mode
#: sequential: each module on activations the upstream maps moved, what compounding maps need;
#: LinEAS: every map trained together through the model).
FITTED = {
    "linear-act, sequential": {"method": "linear-act", "mode": "sequential"},
    "joint-act, sequential": {"method": "joint-act", "mode": "sequential"},
    "lineas": {"method": "lineas"},
}
DIRECTIONS = 256


def sliced_distance(source: dict, target: dict) -> float:
    """Σ modules of the mean W2² between the samples' projections on DIRECTIONS fixed random
    unit directions."""
    total = 0.0
    for name, samples in source.items():
        generator = torch.Generator().manual_seed(0)
        directions = torch.randn(samples.shape[1], DIRECTIONS, generator=generator)
        directions /= directions.norm(dim=0)
        x, y = couple(samples.float() @ directions, target[name].float() @ directions)
        total += float(((x - y) ** 2).mean(0).mean())
    return total


def variants() -> dict[str, tuple[object, str]]:
    """name → (an estimator (source, target) → map, or fit options (FITTED); the support it is
    applied with: fitted ones use their default)."""
    found: dict[str, tuple[object, str]] = {
        "linear-act": (get_method("linear-act").fit, "q0-100"),
        "mean-act": (get_method("mean-act").fit, "q0-100"),
        "linear-act, support all": (get_method("linear-act").fit, "all"),
        "mean-act, support all": (get_method("mean-act").fit, "all"),
    }
    for rank in RANKS:
        for shrink, cross in ((True, False), (False, False), (True, True)):
            name = f"joint r={rank}{'' if shrink else ' unshrunk'}{' cross-fit' if cross else ''}"
            found[name] = (
                lambda s, t, r=rank, sh=shrink, c=cross: fit_joint(s, t, r, sh, cross_fit=c),
                "all",
            )
    for rank in (1, 4):  # bounded: each unit moved only inside the source's range
        found[f"joint r={rank}, support q0-100"] = (
            lambda s, t, r=rank: fit_joint(s, t, r),
            "q0-100",
        )
    for levels in LEVELS:
        for knots in KNOTS:
            for prior in PRIORS:
                found[f"quantile {levels} K={knots} P={prior:g}"] = (
                    lambda s, t, k=knots, p=prior, lv=levels: fit_quantile(
                        s, t, knots=k, prior=p, levels=lv
                    ),
                    "q0-100",
                )
    for name, options in FITTED.items():
        found[name] = (options, "")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 400])
    parser.add_argument("--held-out", type=int, default=128)
    parser.add_argument("--modules", nargs="+", default=["attn-out", "post-attn-ln"])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "runs" / "quantile-study.json"
    )
    args = parser.parse_args()
    run = begin("benchmarks/quantile_study.py", None, args.threads)
    model, tok = actsteer.load_model("smollm2-135m")
    results = load_json(args.out)
    held_source = read_lines("source_val", 0, args.held_out)
    held_target = read_lines("target_val", 0, args.held_out)
    estimators = variants()
    for modules in args.modules:
        plain: dict = {}
        for size in args.sizes:
            todo = [
                v
                for v in estimators
                if "sliced" not in results.get(f"{modules} | {size} | {v}", {})
            ]
            if not todo:
                continue
            source, target = read_lines("source", 0, size), read_lines("target", 0, size)
            base = actsteer.fit(
                model, tok, source=source, target=target, modules=modules, progress=False
            )
            names = base.modules
            fit_source = record(model, tok, source, names, progress=False)
            fit_target = record(model, tok, target, names, progress=False)
            if not plain:
                plain["target"] = record(model, tok, held_target, names, progress=False)
                unsteered = record(model, tok, held_source, names, progress=False)
                plain["distance"] = end_to_end_distance(unsteered, plain["target"])
                plain["sliced"] = sliced_distance(unsteered, plain["target"])
            for variant in todo:
                started = time.perf_counter()
                estimate, support = estimators[variant]
                if isinstance(estimate, dict):
                    steering = actsteer.fit(
                        model, tok, source=source, target=target, modules=modules,
                        progress=False, **estimate,
                    )  # fmt: skip
                    support = steering.default_support
                else:
                    maps = {n: estimate(fit_source[n], fit_target[n]) for n in names}
                    for module, amap in maps.items():  # the supports, as Method.fit sets them
                        amap.bounds = support_bounds(fit_source[module])
                    steering = dataclasses.replace(base, maps=maps)
                with steering.applied(model, 1.0, support):
                    steered = record(model, tok, held_source, names, progress=False)
                distance = end_to_end_distance(steered, plain["target"])
                sliced = sliced_distance(steered, plain["target"])
                key = f"{modules} | {size} | {variant}"
                results[key] = {
                    "distance": distance,
                    "unsteered": plain["distance"],
                    "ratio": distance / plain["distance"],
                    "sliced": sliced / plain["sliced"],
                    "seconds": time.perf_counter() - started,
                }
                save_json(args.out, results)
                print(f"{key}: ratio {distance / plain['distance']:.3f}, sliced "
                      f"{sliced / plain['sliced']:.3f}", flush=True)  # fmt: skip
    rows = [
        [*key.split(" | "), f"{r['ratio']:.3f}", f"{r['sliced']:.3f}" if "sliced" in r else "–"]
        for key, r in results.items()
    ]
    header = ["modules", "texts per set", "steering", "held-out W2 ÷ unsteered", "sliced W2 ÷"]
    print(table(header, rows))
    print(f"{run.command}; {run.env}; {run.seconds() / 60:.1f} min")


if __name__ == "__main__":
    main()
