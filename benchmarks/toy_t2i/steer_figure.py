"""One labelled grid of both steerings on the toy model: rows prompts, columns λ.

Negation rows are "X, no pink square" prompts whose unsteered image (λ = 0, evaluation noise
20,000 + prompt index, as in steer_eval) shows the pink square; style rows are plain "X".

  .venv/bin/python -m benchmarks.toy_t2i.steer_figure /tmp/t2i_v1 NEG.safetensors \
      STYLE.safetensors -o docs/images/toy_t2i_steering.png
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import actsteer
from tests.toy_t2i_world import dataset as ds
from tests.toy_t2i_world import measure
from tests.toy_t2i_world.figure import grid
from tests.toy_t2i_world.pipeline import load

from .steer_eval import EVAL_SEED, STRENGTHS, sweep


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("negation", help="steering fitted by steer_eval --task negation --save")
    ap.add_argument("style", help="steering fitted by steer_eval --task style --save")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--rows", type=int, default=4, help="rows per task")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    negation = actsteer.Steering.load(args.negation)
    style = actsteer.Steering.load(args.style)
    combos = ds.base_prompts()
    negated = [ds.caption_for(*c, negation=True) for c in combos]
    plain = sweep(pipe, negated, [0.0], None, seed=EVAL_SEED, cfg="conditional", support=None)
    pink = [i for i, row in enumerate(plain) if measure.has_pink(row[0])]
    picks = [pink[k] for k in np.linspace(0, len(pink) - 1, args.rows).round().astype(int)]
    rows, labels = [], []
    for i in picks:  # the prompt index fixes the noise: evaluate each alone at its own seed
        rows += sweep(pipe, [negated[i]], STRENGTHS, negation, seed=EVAL_SEED + i,
                      cfg="conditional", support=None)  # fmt: skip
        labels.append(f"negation: {negated[i]}")
    spread = np.linspace(0, len(combos) - 1, args.rows).round().astype(int)
    styled = [ds.caption_for(*combos[i]) for i in spread]
    rows += sweep(pipe, styled, STRENGTHS, style, seed=EVAL_SEED, cfg="conditional", support=None)
    labels += [f"style: {p}" for p in styled]
    title = (
        f"toy model, 20 DDIM steps, guidance 4; negation: {negation.info.support} support, "
        f"style: {style.info.support}"
    )
    grid(rows, labels, [f"lambda={s:g}" for s in STRENGTHS], args.out, scale=2,
         label_width=260, title=title)  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
