"""Induce a concept: steer neutral sentences towards football (the texts ship with actsteer)
with support "all", so every activation moves, and sweep λ to watch the topic appear.

    python examples/concept_induction.py
"""

from __future__ import annotations

import argparse

import actsteer
from actsteer.generation import generate_grid
from actsteer.texts import package_texts

PROMPTS = ["Yesterday I went to the", "My favourite thing about summer is", "The news today"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, folder or hub id")
    parser.add_argument("--texts", type=int, default=256, help="texts of each set to fit on")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--max-new-tokens", type=int, default=30)
    args = parser.parse_args()

    model, tok = actsteer.load_model(args.model)
    neutral = package_texts("neutral")[: args.texts]
    football = package_texts("football")[: args.texts]
    steering = actsteer.fit(model, tok, neutral, football, method="linear-act", support="all")
    print(steering)
    rows = generate_grid(
        model, tok, PROMPTS, args.strengths, steering, max_new_tokens=args.max_new_tokens,
        repetition_penalty=1.3,
    )  # fmt: skip
    for prompt, row in zip(PROMPTS, rows, strict=True):
        print(f"\n{prompt}")
        for lam, text in zip(args.strengths, row, strict=True):
            print(f"  λ {lam:<4g} {text.strip()}")


if __name__ == "__main__":
    main()
