"""A library-independent check that the toy model is steerable by activation transport.

This is NOT actsteer's diffusers integration (that lives in src/actsteer/); it is ~100 lines of
plain forward hooks so the toy model's suitability can be judged on its own: Linear-AcT maps
(actsteer.methods.linear_act.fit_linear, independent per module) on every GroupNorm/LayerNorm
output of the UNet, statistics pooled over space (B,C,H,W) or tokens (B,T,D) from the
conditional half of the classifier-free-guidance batch at every denoising step, the map applied
per channel to both halves during the whole loop.

    .venv/bin/python -m benchmarks.toy_t2i.act_check [MODEL_DIR] [--fit-seeds 2] [--seeds 2]

Reports (a) negation: pink rate of "X, no pink square" at strengths 0, 0.5, 1 (maps fitted from
"X, no pink square" to "X", support = source range), with the share of images whose background
and main-object colour are kept; (b) style: stripe score of "X" at strengths 0..1 (maps fitted
from "X" to "X, striped style", support = all).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from actsteer.methods.linear_act import fit_linear
from tests.toy_t2i_world import dataset as ds
from tests.toy_t2i_world import measure
from tests.toy_t2i_world.figure import grid
from tests.toy_t2i_world.pipeline import load

from .sample import STEPS, generate


def norm_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Every GroupNorm and LayerNorm of the UNet, by qualified name."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, nn.GroupNorm | nn.LayerNorm)}


def _pool(out: torch.Tensor) -> torch.Tensor:
    if out.dim() == 4:  # (B, C, H, W)
        return out.mean(dim=(2, 3))
    return out.mean(dim=1) if out.dim() == 3 else out  # (B, T, D) or (B, D)


@contextlib.contextmanager
def _hooks(modules: dict[str, nn.Module], fn: Callable) -> Iterator[None]:
    handles = [m.register_forward_hook(fn(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def record(pipe, prompts: list[str], seeds: list[int]) -> dict[str, torch.Tensor]:
    """Pooled activations of the conditional half, all steps: name -> (prompts*steps, C)."""
    mods = norm_modules(pipe.unet)
    store: dict[str, list[torch.Tensor]] = {n: [] for n in mods}

    def make(name: str):
        def hook(_m, _i, out):
            store[name].append(_pool(out[out.shape[0] // 2 :]).detach())

        return hook

    with _hooks(mods, make):
        generate(pipe, prompts, seeds)
    return {n: torch.cat(v) for n, v in store.items()}


def fit(src: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor], support: str) -> dict:
    """Per module (omega, beta, lo, hi)."""
    maps = {}
    for name in src:
        omega, beta = fit_linear(src[name], tgt[name])
        if support == "source":
            lo, hi = src[name].min(0).values, src[name].max(0).values
        else:
            lo = torch.full_like(omega, -float("inf"))
            hi = torch.full_like(omega, float("inf"))
        maps[name] = (omega, beta, lo, hi)
    return maps


@contextlib.contextmanager
def applied(pipe, maps: dict, strength: float, halves: str = "both") -> Iterator[None]:
    """T_lambda(a) = a + lambda (omega a + beta - a) inside [lo, hi], per channel.

    halves="both" steers the whole classifier-free-guidance batch, "cond" only its second half.
    """
    mods = norm_modules(pipe.unet)

    def make(name: str):
        omega, beta, lo, hi = maps[name]

        def hook(_m, _i, out):
            shape = {4: (1, -1, 1, 1), 3: (1, 1, -1), 2: (1, -1)}[out.dim()]
            w, b, lo_, hi_ = (t.view(shape) for t in (omega, beta, lo, hi))
            moved = out + strength * (w * out + b - out)
            moved = torch.where((out > lo_) & (out < hi_), moved, out)
            if halves == "cond":
                moved = torch.cat([out[: out.shape[0] // 2], moved[out.shape[0] // 2 :]])
            return moved

        return hook

    with _hooks(mods, make):
        yield


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Fit both steerings on fit seeds, evaluate on other seeds, print JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--fit-seeds", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--negation-strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--style-strengths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--halves", choices=["both", "cond"], default="both")
    ap.add_argument("--combo-stride", type=int, default=1, help="use every k-th base prompt")
    ap.add_argument("--grid", default=None, help="PNG: rows strengths, columns prompts")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    combos = ds.base_prompts()[:: args.combo_stride]
    fit_seeds = [10_000 + k for k in range(args.fit_seeds)]
    eval_seeds = [20_000 + k for k in range(args.seeds)]

    def prompts(seeds: list[int], **kw) -> tuple[list[str], list[int]]:
        ps = [ds.caption_for(*c, **kw) for c in combos for _ in seeds]
        return ps, [s for _ in combos for s in seeds]

    out: dict[str, object] = {"modules": len(norm_modules(pipe.unet)), "steps": STEPS}
    # (a) negation
    neg = fit(
        record(pipe, *prompts(fit_seeds, negation=True)),
        record(pipe, *prompts(fit_seeds)),
        "source",
    )
    ps, ss = prompts(eval_seeds, negation=True)
    base = None
    rows = {}
    shown: list[tuple[str, list[np.ndarray]]] = []
    picks = list(range(0, len(combos) * args.seeds, 7 * args.seeds))[:8]
    for lam in args.negation_strengths:
        with applied(pipe, neg, lam, args.halves):
            imgs = generate(pipe, ps, ss)
        base = imgs if base is None else base
        shown.append((f"X, no pink square; negation lambda={lam}", [imgs[i] for i in picks]))
        kept = [measure.kept(a, b)["both"] for a, b in zip(base, imgs, strict=True)]
        rows[lam] = {
            "pink_rate": float(np.mean([measure.has_pink(i) for i in imgs])),
            "kept": float(np.mean(kept)),
        }
    plain = generate(pipe, *prompts(eval_seeds))
    out["negation"] = rows
    out["negation_plain_pink_rate"] = float(np.mean([measure.has_pink(i) for i in plain]))
    # (b) style
    sty = fit(
        record(pipe, *prompts(fit_seeds)), record(pipe, *prompts(fit_seeds, striped=True)), "all"
    )
    ps, ss = prompts(eval_seeds)
    rows = {}
    for lam in args.style_strengths:
        with applied(pipe, sty, lam, args.halves):
            imgs = generate(pipe, ps, ss)
        scores = [measure.stripe_score(i) for i in imgs]
        shown.append((f"X; style lambda={lam}", [imgs[i] for i in picks]))
        rows[lam] = {
            "stripe_score": float(np.mean(scores)),
            "striped_rate": float(np.mean([s > measure.STRIPE_THRESHOLD for s in scores])),
        }
    out["style"] = rows
    print(json.dumps(out, indent=2))
    if args.grid:
        cols = [" ".join(combos[i // args.seeds]) for i in picks]
        grid(
            [r for _, r in shown], [n for n, _ in shown], cols, args.grid, scale=4, label_width=170
        )
    return out


if __name__ == "__main__":
    main()
