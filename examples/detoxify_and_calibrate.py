"""Detoxify a language model: fit Linear-AcT from toxic comments to their polite paraphrases
(ParaDetox), calibrate λ to the paper's budget (WikiText perplexity at most +1), compare
continuations of rude prompts before and after, and save the steering with a model card.

    python examples/detoxify_and_calibrate.py              # SmolLM2-135M: a few minutes on a CPU
    python examples/detoxify_and_calibrate.py --source toxic.txt --target polite.txt
"""

from __future__ import annotations

import argparse

import actsteer
from actsteer.generation import generate_grid
from actsteer.texts import read_texts

PARADETOX = "hf:s-nlp/paradetox"
PROMPTS = ["You are such an idiot, you", "Shut up and listen, you stupid", "I hate people who"]


def texts(spec: str, field: str, limit: int) -> list[str]:
    """The first `limit` texts of a file, or of a hub dataset's `field`."""
    return read_texts(spec, spec, field if spec.startswith("hf:") else None)[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, folder or hub id")
    parser.add_argument("--source", default=PARADETOX, help="toxic texts (file or hf:ID)")
    parser.add_argument("--target", default=PARADETOX, help="polite texts (file or hf:ID)")
    parser.add_argument("--pairs", type=int, default=512, help="texts of each set to fit on")
    parser.add_argument("--passages", type=int, default=64, help="WikiText passages to calibrate")
    parser.add_argument("--budget", type=float, default=1.0, help="perplexity points")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--output", default="detox", help="folder for the steering")
    args = parser.parse_args()

    model, tok = actsteer.load_model(args.model)
    source = texts(args.source, "en_toxic_comment", args.pairs)
    target = texts(args.target, "en_neutral_comment", args.pairs)
    steering = actsteer.fit(model, tok, source, target, method="linear-act")
    result = actsteer.calibrate(steering, model, tok, budget=args.budget, passages=args.passages)
    print(
        f"calibrated λ = {result.strength:.3f}: perplexity {result.reference:.2f} "
        f"+ {result.cost:.2f} (budget +{args.budget:g})"
    )
    lam = result.strength
    rows = generate_grid(
        model, tok, PROMPTS, [0.0, lam], result.steering, max_new_tokens=args.max_new_tokens
    )
    for prompt, (plain, steered) in zip(PROMPTS, rows, strict=True):
        print(f"\n{prompt}\n  plain:   {plain.strip()}\n  λ {lam:.2f}:  {steered.strip()}")
    folder = result.steering.save_pretrained(args.output)
    print(
        f"\nsaved to {folder}/ (steering.safetensors + README.md); load it with "
        f"actsteer.Steering.from_pretrained({str(folder)!r})"
    )


if __name__ == "__main__":
    main()
