"""Steer a text-to-image pipeline's style: fit on captions (source) and the same captions in
watercolour (target), then draw new prompts at λ = 0, 0.5 and 1 from the same noise, as one
labelled grid (needs `pip install ".[diffusion]"`).

    python examples/text_to_image_style.py               # SD-Turbo from the hub; a GPU helps
    python examples/text_to_image_style.py --model DIR --device cuda
"""

from __future__ import annotations

import argparse

import actsteer
from actsteer.diffusion import generate_images, image_grid

SUBJECTS = [
    "a lighthouse on a cliff", "a cat asleep on a sofa", "a busy market street", "a mountain lake",
    "an old bicycle against a wall", "a bowl of fruit on a table", "a city skyline at dusk",
    "a sailing boat in a harbour",
]  # fmt: skip
PROMPTS = ["a fox in a snowy forest", "a cup of coffee on a desk"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="stabilityai/sd-turbo", help="diffusers id or folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps")
    parser.add_argument("--denoising-steps", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=0.0)
    parser.add_argument("--size", type=int, default=512, help="image height and width")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--output", default="watercolour.png")
    args = parser.parse_args()

    pipe = actsteer.load_pipeline(args.model, device=args.device)
    run = {
        "denoising_steps": args.denoising_steps, "guidance_scale": args.guidance_scale,
        "height": args.size, "width": args.size,
    }  # fmt: skip
    source = SUBJECTS
    target = [f"{subject}, watercolour painting" for subject in SUBJECTS]
    steering = actsteer.fit(
        pipe, source=source, target=target, modules="unet-norms", support="all",
        mode=actsteer.Denoising.of(**run),
    )  # fmt: skip
    images = generate_images(pipe, PROMPTS, args.strengths, steering, **run)
    image_grid(images, PROMPTS, args.strengths).save(args.output)
    print(f"saved {args.output}: rows {PROMPTS}, columns λ = {args.strengths}")


if __name__ == "__main__":
    main()
