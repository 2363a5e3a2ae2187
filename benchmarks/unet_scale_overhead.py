"""Steering overhead on a UNet of Stable Diffusion 1.5's shape (issue 5, context for the toy).

The toy model of benchmarks/toy_t2i has 32–128 channels, so its convolutions are cheap and the
one extra pass over every norm output that steering adds is a visible share of a step. This
script measures the same hooks on a UNet2DConditionModel built from SD-1.5's architecture
(320/640/1280/1280 channels, 2 layers per block, cross-attention width 768) with random
weights — speed does not depend on weight values, and no weights can be downloaded here.

Steering: one per-channel map on every GroupNorm and LayerNorm of the UNet (the `unet-norms`
modules; random ω, β, bounds), λ = 1, both CFG halves (the bare UNet is steered, so this is
the upper bound of the pipeline's default, which steers the conditional half). Variants
unsteered, q0-100, all; per round one untimed call and --reps timed calls per variant, order
rotated each round; ratio = unsteered time ÷ steered time per round, median (min–max).

  .venv/bin/python benchmarks/unet_scale_overhead.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import (
    begin,
    contention,
    fmt_spread,
    rotated,
    table,
    throughput_ratios,
    variant,
    wait_for_quiet,
)
from diffusers import UNet2DConditionModel
from torch import nn

from actsteer import Steering
from actsteer.maps import AffineMap, support_bounds

VARIANTS = ("unsteered", "q0-100", "all")
SD15_SHAPE = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    in_channels=4,
    out_channels=4,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latent-size", type=int, default=32, help="64 = SD-1.5 at 512 px")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reps", type=int, default=2)
    return parser.parse_args(argv)


def random_steering(unet: nn.Module) -> Steering:
    """A map on every norm of the UNet, with random ω, β and bounds of random samples."""
    g = torch.Generator().manual_seed(0)
    maps = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.GroupNorm | nn.LayerNorm):
            width = (
                module.num_channels if isinstance(module, nn.GroupNorm) else module.weight.numel()
            )
            amap = AffineMap(
                1 + 0.1 * torch.randn(width, generator=g), 0.1 * torch.randn(width, generator=g)
            )
            amap.bounds = support_bounds(torch.randn(256, width, generator=g))
            maps[name] = amap
    return Steering(maps)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = begin("benchmarks/unet_scale_overhead.py", argv, args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=args.latent_size, **SD15_SHAPE).eval()
    steering = random_steering(unet)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"UNet {params:.0f}M parameters, {len(steering.maps)} norms steered", flush=True)
    size = args.latent_size
    latents = torch.randn(2, 4, size, size)
    text = torch.randn(2, 77, 768)
    t = torch.tensor(500)

    def call() -> None:
        unet(latents, t, encoder_hidden_states=text)

    times: dict[str, list[float]] = {n: [] for n in VARIANTS}
    with torch.inference_mode():
        for r in range(args.rounds + 1):  # round 0 is a warm-up
            wait_for_quiet()
            for name in rotated(VARIANTS, r):
                with variant(steering, unet, name):
                    call()
                    samples = []
                    for _ in range(args.reps):
                        start = time.perf_counter()
                        call()
                        samples.append(time.perf_counter() - start)
                if r:
                    times[name].append(statistics.median(samples))
            if r:
                print(f"  round {r}: " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in times.items()))
    ratios = throughput_ratios(times, "lower")
    base = statistics.median(times["unsteered"])
    rows = [
        [
            f"one UNet call, CFG batch 2, latents {size}×{size}",
            f"{base:.2f} s",
            name,
            f"{statistics.median(times[name]):.2f} s",
            fmt_spread(ratios[name]),
        ]
        for name in VARIANTS[1:]
    ]
    print()
    print("## Steering overhead, SD-1.5-shaped UNet")
    print()
    print(f"- machine: {run.env}")
    print(f"- command: {run.command}")
    print(f"- UNet: {params:.0f}M parameters, {len(steering.maps)} norms steered, λ = 1")
    print(f"- wall time: {run.seconds():.0f} s; contention: {contention()}")
    print()
    print(table(["measurement", "unsteered", "support", "steered", "ratio median (min–max)"], rows))


if __name__ == "__main__":
    main()
