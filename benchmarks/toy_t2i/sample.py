"""Sample the toy model and render labelled PNG grids (rows: prompts, columns: seeds).

    .venv/bin/python -m benchmarks.toy_t2i.sample [MODEL_DIR] -o grid.png \
        [--prompt "a red circle on a blue background" ...] [--seeds 0 1 2 3]

MODEL_DIR defaults to the training default ($ACTSTEER_CACHE/toy_t2i or ~/.cache/actsteer/toy_t2i).
`load` and `grid` live in tests/toy_t2i_world (pipeline.py, figure.py), shared with the tests.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tests.toy_t2i_world.figure import grid
from tests.toy_t2i_world.pipeline import load

STEPS = 20
GUIDANCE = 4.0
DEFAULT_PROMPTS = [
    "a red circle on a blue background",
    "a yellow triangle on a black background",
    "a blue square on a white background",
    "a white circle on a green background",
    "a red circle on a blue background, striped style",
    "a red circle and a pink square on a blue background",
    "a red circle on a blue background, no pink square",
    "a green triangle and a yellow circle on a black background",
]


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    batch: int = 32,
) -> list[np.ndarray]:
    """One uint8 image per (prompt, seed) pair, prompt i with seed i (lists of equal length).

    Each image gets its own `torch.Generator().manual_seed(seed)`, so an image depends only on
    its prompt and seed, not on what else shares its batch.
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), batch):
        ps, ss = list(prompts[i : i + batch]), seeds[i : i + batch]
        gens = [torch.Generator().manual_seed(int(s)) for s in ss]
        res = pipe(
            ps,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
        )
        out.extend((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
    return out


def sample_grid(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    path: str | Path,
    *,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
) -> Path:
    """Generate every prompt with every seed and write the grid (rows prompts, columns seeds)."""
    flat_p = [p for p in prompts for _ in seeds]
    flat_s = [s for _ in prompts for s in seeds]
    images = generate(pipe, flat_p, flat_s, steps=steps, guidance=guidance)
    rows = [images[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(prompts))]
    title = f"{steps} DDIM steps, guidance {guidance}"
    return grid(rows, prompts, [f"seed {s}" for s in seeds], path, title=title)


def main(argv: list[str] | None = None) -> None:
    """Command line: write a grid of the given prompts and seeds."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("-o", "--out", default="toy_t2i_grid.png")
    ap.add_argument("--prompt", action="append", dest="prompts")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--guidance", type=float, default=GUIDANCE)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    path = sample_grid(
        pipe,
        args.prompts or DEFAULT_PROMPTS,
        args.seeds,
        args.out,
        steps=args.steps,
        guidance=args.guidance,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
