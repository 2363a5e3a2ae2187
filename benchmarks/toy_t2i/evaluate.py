"""Measure how well the trained toy model follows its captions (on seeds never used in training).

    .venv/bin/python -m benchmarks.toy_t2i.evaluate [MODEL_DIR] [--seeds N] [--json out.json]
        [--grid grid.png]

Three checks, all with the pixel detectors of `measure.py`:

(a) control: for every (colour, shape, background) the generator can draw, plain captions
    "a red circle on a blue background": rates at which the detected background colour, main
    object colour and shape agree with the caption;
(b) negation: the same base prompts as "X", "X and a pink square" and "X, no pink square":
    rate of images showing the pink square (the toy model should draw it for both prompts that
    mention it, and not for "X");
(c) style: "X" against "X, striped style": mean stripe score and rate above the threshold.

Prompts and seeds: the 51 base combinations, each with `--seeds` seeds starting at 1000.
Training never sees a diffusion seed (its noise comes from its own generator), so every
image here is new; the captions themselves are the training captions, as in the paper's use.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from tests.toy_t2i_world import dataset as ds
from tests.toy_t2i_world import measure
from tests.toy_t2i_world.figure import grid
from tests.toy_t2i_world.pipeline import load

from .sample import GUIDANCE, STEPS, generate

SEED0 = 1000


def _rate(values: list[bool]) -> float:
    return float(np.mean(values)) if values else float("nan")


def evaluate(
    pipe, seeds_per_prompt: int = 2, steps: int = STEPS, guidance: float = GUIDANCE
) -> tuple[dict[str, object], dict[str, list[np.ndarray]]]:
    """Run the three checks; returns the numbers and the images by prompt family."""
    combos = ds.base_prompts()
    seeds = [SEED0 + k for k in range(seeds_per_prompt)]
    families = {
        "plain": lambda c, s, b: ds.caption_for(c, s, b),
        "pink": lambda c, s, b: ds.caption_for(c, s, b, pink=True),
        "negation": lambda c, s, b: ds.caption_for(c, s, b, negation=True),
        "striped": lambda c, s, b: ds.caption_for(c, s, b, striped=True),
    }
    images: dict[str, list[np.ndarray]] = {}
    found: dict[str, list[dict[str, object]]] = {}
    for name, make in families.items():
        prompts = [make(*combo) for combo in combos for _ in seeds]
        flat_seeds = [s for _ in combos for s in seeds]
        images[name] = generate(pipe, prompts, flat_seeds, steps=steps, guidance=guidance)
        found[name] = [measure.describe(img) for img in images[name]]
    truth = [combo for combo in combos for _ in seeds]

    def agree(name: str, key: str, pos: int) -> float:
        return _rate([f[key] == t[pos] for f, t in zip(found[name], truth, strict=True)])

    result: dict[str, object] = {
        "images_per_family": len(truth),
        "seeds": seeds,
        "steps": steps,
        "guidance": guidance,
        "control": {
            fam: {
                "background": agree(fam, "background", 2),
                "colour": agree(fam, "colour", 0),
                "shape": agree(fam, "shape", 1),
            }
            for fam in ("plain", "striped")
        },
        "pink_rate": {fam: _rate([bool(f["pink"]) for f in found[fam]]) for fam in families},
        "stripe_score_mean": {
            fam: float(np.mean([f["stripe_score"] for f in found[fam]])) for fam in families
        },
        "striped_rate": {fam: _rate([bool(f["striped"]) for f in found[fam]]) for fam in families},
    }
    return result, images


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Command line: print (and optionally save) the measurements and a grid of examples."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--guidance", type=float, default=GUIDANCE)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--grid", type=Path, default=None, help="PNG with examples of each family")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    t0 = time.perf_counter()
    result, images = evaluate(pipe, args.seeds, args.steps, args.guidance)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.grid:
        # 8 base prompts (every 7th combination: all shapes), first seed of each, one row per family
        picks = list(range(0, len(ds.base_prompts()), 7))[:8]
        rows = [[images[fam][i * args.seeds] for i in picks] for fam in images]
        combos = ds.base_prompts()
        cols = [f"{c} {s} / {b}" for c, s, b in (combos[i] for i in picks)]
        labels = ["X", "X and a pink square", "X, no pink square", "X, striped style"]
        grid(rows, labels, cols, args.grid, scale=4, label_width=150, title="X = column label")
        print(f"wrote {args.grid}")
    return result


if __name__ == "__main__":
    main()
