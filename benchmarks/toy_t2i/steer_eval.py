"""AcT with the library on the toy text-to-image model: concept negation and style control.

Fits with `actsteer.fit(pipe, ...)` and evaluates with `actsteer.diffusion.generate_images`
(one pipeline call per chunk of prompts, a per-row λ). Fit and evaluation noise are disjoint:
seed 10,000 + prompt index for fitting, 20,000 + prompt index for evaluation.

  negation  fit source "X, no pink square" (--source negation; "pink": "X and a pink square";
            "both": the two together) → target "X"; apply to "X, no pink square" over the λ
            grid. Reports the pink rate (and the rate for plain "X" on the same seeds), and the
            "kept" rate: background and main-object colour unchanged from λ = 0.
  style     fit "X" → "X, striped style"; apply to "X". Reports the mean stripe score, the
            striped rate (score > 5) and the kept rate.

--mode sequential fits stage by stage (UNet down blocks, mid block, up blocks, output norm),
each stage on source activations already transported by the earlier ones (`fit_by_stages`,
built on `record_pipeline`: the library fits pipelines in independent mode only).

One configuration per run; results are appended as one JSON line to --out:

  .venv/bin/python -m benchmarks.toy_t2i.steer_eval /tmp/t2i_v1 --task negation \
      --modules unet-norms --support all --cfg conditional --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import actsteer
from actsteer.capture import resolve_modules
from actsteer.diffusion import generate_images, record_pipeline
from actsteer.maps import AffineMap
from actsteer.methods import get_method
from actsteer.tree import module_tree
from tests.toy_t2i_world import dataset as ds
from tests.toy_t2i_world import measure
from tests.toy_t2i_world.figure import grid
from tests.toy_t2i_world.pipeline import load

from .sample import GUIDANCE, STEPS

FIT_SEED = 10_000
EVAL_SEED = 20_000
STRENGTHS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] (diffusers' "np" output) as uint8, rounded as PIL does."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def prompts_for(kind: str, combos: Sequence[tuple[str, str, str]], repeats: int) -> list[str]:
    """Prompts of one family ("plain", "negation", "pink", "striped") for every combo, repeated
    `repeats` times (each repetition gets other noise: the seed follows the prompt index)."""
    options = {"plain": {}, "negation": {"negation": True}, "pink": {"pink": True}}
    options["striped"] = {"striped": True}
    return [ds.caption_for(*c, **options[kind]) for _ in range(repeats) for c in combos]


def sweep(
    pipe,
    prompts: Sequence[str],
    strengths: Sequence[float],
    steering: actsteer.Steering | None,
    *,
    seed: int,
    cfg: str,
    support: str | None,
    chunk: int = 8,
) -> list[list[np.ndarray]]:
    """images[p][s] (uint8): prompt p at strength s, noise seed + p, chunks of prompts."""
    out: list[list[np.ndarray]] = []
    for start in range(0, len(prompts), chunk):
        rows = generate_images(
            pipe, prompts[start : start + chunk], strengths, steering, support=support,
            steps=STEPS, guidance_scale=GUIDANCE, seed=seed + start, guidance=cfg, output_type="np",
        )  # fmt: skip
        out += [[to_uint8(image) for image in row] for row in rows]
    return out


def rates(images: list[list[np.ndarray]], strengths: Sequence[float]) -> dict[str, dict]:
    """Per λ: pink rate, mean stripe score, striped rate, kept rate (vs the λ = 0 column)."""
    table = {}
    for s, lam in enumerate(strengths):
        column = [row[s] for row in images]
        scores = [measure.stripe_score(i) for i in column]
        table[f"{lam:g}"] = {
            "pink_rate": float(np.mean([measure.has_pink(i) for i in column])),
            "stripe_score": float(np.mean(scores)),
            "striped_rate": float(np.mean([v > measure.STRIPE_THRESHOLD for v in scores])),
            "kept": float(np.mean([measure.kept(row[0], row[s])["both"] for row in images])),
        }
    return table


def module_names(pipe, specs: Sequence[str]) -> list[str]:
    """The union of several presets / regexes, in module order."""
    tree = module_tree(pipe)
    chosen = {name for spec in specs for name in resolve_modules(tree, spec)}
    return [name for name, _ in tree.named_modules() if name in chosen]


def unet_stage(name: str) -> int:
    """Execution rank of a UNet module's stage: down blocks, mid block, up blocks, output norm."""
    found = re.match(r"unet\.(down_blocks|mid_block|up_blocks)(?:\.(\d+))?", name)
    if found is None:
        return 100 if name.startswith("unet.") else -1  # text encoder first
    offset = {"down_blocks": 0, "mid_block": 10, "up_blocks": 20}[found[1]]
    return offset + int(found[2] or 0)


def fit_by_stages(
    pipe,
    source: Sequence[str],
    target: Sequence[str],
    modules: Sequence[str],
    *,
    method: str,
    support: str | None,
    options: dict,
) -> actsteer.Steering:
    """Sequential estimation by stages: each stage's maps are fitted on source activations
    recorded with the maps of every earlier stage applied (λ = 1); the target is recorded once.

    The library fits pipelines independently only; this costs one source pass per stage.
    """
    estimator = get_method(method)
    support = support or estimator.default_support
    target_samples = record_pipeline(pipe, target, modules, progress=False, **options)
    info = actsteer.SteeringInfo(method=method, support=support, mode="sequential (stages)")
    maps: dict[str, AffineMap] = {}
    for stage in sorted({unet_stage(n) for n in modules}):
        names = [n for n in modules if unet_stage(n) == stage]
        with actsteer.Steering(dict(maps), info).applied(pipe, 1.0, support):
            source_samples = record_pipeline(pipe, source, names, progress=False, **options)
        for name in names:
            maps[name] = estimator.fit(source_samples[name], target_samples[name])
    return actsteer.Steering({n: maps[n] for n in modules}, info)


def run(args: argparse.Namespace) -> dict[str, object]:
    """Fit one steering for the task and evaluate it over the λ grid."""
    pipe = load(args.model)
    combos = ds.base_prompts()[:: args.combo_stride]
    if args.task == "negation":
        kinds = {"negation": ["negation"], "pink": ["pink"], "both": ["negation", "pink"]}
        source = [p for k in kinds[args.source] for p in prompts_for(k, combos, args.fit_repeats)]
        target = prompts_for("plain", combos, args.fit_repeats) * len(kinds[args.source])
        evaluated = prompts_for("negation", combos, args.eval_repeats)
    else:
        source = prompts_for("plain", combos, args.fit_repeats)
        target = prompts_for("striped", combos, args.fit_repeats)
        evaluated = prompts_for("plain", combos, args.eval_repeats)
    modules = module_names(pipe, args.modules)
    options = dict(steps=STEPS, guidance_scale=GUIDANCE, every=args.every, seed=FIT_SEED)
    start = time.perf_counter()
    if args.mode == "sequential":
        steering = fit_by_stages(pipe, source, target, modules, method=args.method,
                                 support=args.support, options=options)  # fmt: skip
    else:
        steering = actsteer.fit(
            pipe, source=source, target=target, modules=modules, support=args.support,
            method=args.method, pipeline_options=options, progress=False,
        )  # fmt: skip
    fit_seconds = time.perf_counter() - start
    settings = dict(seed=EVAL_SEED, cfg=args.cfg, support=args.support)
    images = sweep(pipe, evaluated, args.strengths, steering, **settings)
    result: dict[str, object] = {
        "task": args.task,
        "modules": " + ".join(args.modules),
        "n_modules": len(modules),
        "method": args.method,
        "support": args.support,
        "cfg": args.cfg,
        "mode": args.mode,
        "every": args.every,
        "source": args.source if args.task == "negation" else "plain",
        "fit_prompts": len(source),
        "eval_prompts": len(evaluated),
        "fit_seconds": round(fit_seconds, 1),
        "by_strength": rates(images, args.strengths),
    }
    if args.task == "negation":
        plain = sweep(
            pipe, prompts_for("plain", combos, args.eval_repeats), [0.0], None, **settings
        )
        result["plain_pink_rate"] = float(np.mean([measure.has_pink(r[0]) for r in plain]))
    if args.save:
        steering.save(args.save)
    if args.grid:
        picks = list(range(0, len(evaluated), max(1, len(evaluated) // args.grid_rows)))
        picks = picks[: args.grid_rows]
        title = f"{args.task}: {' + '.join(args.modules)}, support {args.support}, cfg {args.cfg}"
        grid(
            [images[i] for i in picks], [evaluated[i] for i in picks],
            [f"lambda={lam:g}" for lam in args.strengths], args.grid, scale=2, label_width=200,
            title=title,
        )  # fmt: skip
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="pipeline folder")
    ap.add_argument("--task", choices=["negation", "style"], required=True)
    ap.add_argument("--modules", nargs="+", default=["unet-norms"], help="presets or regexes")
    ap.add_argument("--method", default="linear-act")
    ap.add_argument("--support", default=None, help="default: the method's (q0-100)")
    ap.add_argument("--cfg", choices=["conditional", "both"], default="conditional")
    ap.add_argument("--every", type=int, default=2, help="record every k-th denoising step")
    ap.add_argument(
        "--mode",
        choices=["independent", "sequential"],
        default="independent",
        help="sequential: by UNet stages, each fitted with earlier stages steered",
    )
    ap.add_argument("--source", choices=["negation", "pink", "both"], default="negation")
    ap.add_argument("--combo-stride", type=int, default=1, help="every k-th of the 51 prompts")
    ap.add_argument("--fit-repeats", type=int, default=2, help="noise seeds per fit prompt")
    ap.add_argument("--eval-repeats", type=int, default=2, help="noise seeds per eval prompt")
    ap.add_argument("--strengths", type=float, nargs="+", default=STRENGTHS)
    ap.add_argument("--out", default=None, help="append the result as a JSON line here")
    ap.add_argument("--save", default=None, help="save the steering (.safetensors)")
    ap.add_argument("--grid", default=None, help="PNG: rows prompts, columns λ")
    ap.add_argument("--grid-rows", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args)
    line = json.dumps(result)
    print(line)
    if args.out:
        with Path(args.out).open("a") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
