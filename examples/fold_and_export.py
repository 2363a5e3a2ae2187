"""Fold a steering into the weights and export it: a stock transformers checkpoint that runs at
the plain model's speed without actsteer (any engine that reads such checkpoints serves it),
and a llama.cpp control vector of an additive steering of the residual stream.

    python examples/fold_and_export.py                   # writes football-folded/ and football.gguf
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import AutoModelForCausalLM

import actsteer
from actsteer.export import export, export_control_vector
from actsteer.texts import package_texts

PROMPT = "Yesterday I went to the"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, folder or hub id")
    parser.add_argument("--texts", type=int, default=256, help="texts of each set to fit on")
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--output", default="football-folded", help="checkpoint folder")
    parser.add_argument("--gguf", default="football.gguf", help="control vector file")
    args = parser.parse_args()

    model, tok = actsteer.load_model(args.model)
    neutral = package_texts("neutral")[: args.texts]
    football = package_texts("football")[: args.texts]
    # Linear-AcT on the norms folds exactly (support "all": every activation moves).
    steering = actsteer.fit(model, tok, neutral, football, modules="post-attn-ln", support="all")
    probe = tok([PROMPT], return_tensors="pt")
    with torch.inference_mode(), steering.applied(model, args.strength, support="all"):
        hooked = model(**probe).logits
    export(steering, copy.deepcopy(model), tok, args.output, args.strength, support="all")
    folded = AutoModelForCausalLM.from_pretrained(args.output)  # no actsteer needed from here
    with torch.inference_mode():
        gap = (folded(**probe).logits - hooked).abs().max().item()
        ids = folded.generate(**probe, max_new_tokens=25, do_sample=False, repetition_penalty=1.3)
    print(f"checkpoint {args.output}/: folded vs hooked logits, max |Δ| = {gap:.1e}")
    new = ids[0, probe["input_ids"].shape[1] :]
    print(f"  {PROMPT}{tok.decode(new, skip_special_tokens=True)}")

    # A control vector holds additive maps (ω = 1) of block outputs: Mean-AcT on the residual
    # stream (llama.cpp never steers block 0, so the export leaves it out and warns).
    additive = actsteer.fit(
        model, tok, neutral, football, method="mean-act", modules="residual", support="all"
    )
    path = export_control_vector(additive, model, args.gguf, strength=args.strength)
    print(f"control vector {path}: llama-cli -m MODEL.gguf --control-vector {path}")


if __name__ == "__main__":
    main()
