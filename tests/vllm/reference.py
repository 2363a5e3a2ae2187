"""What the vLLM plugin's tests compare against: prompts, the second steering's modules, and
Hugging Face's greedy continuation under actsteer's hooks."""

from __future__ import annotations

import os
from importlib.resources import files

import torch

import actsteer
from actsteer.models import _cached_alias

os.environ.setdefault("ACTSTEER_FUSED_KERNEL", "0")  # the plain hook path: no kernel build here

PROMPTS = [
    "The weather today is",
    "My favourite hobby is",
    "Yesterday I went to the",
    "The best way to spend a Sunday is",
]
TOKENS = 16
#: Modules of the second steering: one of each kind the plugin maps (decoder blocks, norms with
#: and without a residual, the output projections, the final norm); it shares
#: layers.7.post_attention_layernorm with the first, so their order matters there.
MIXED_MODULES = [
    "model.layers.3",
    "model.layers.20",
    "model.layers.0.input_layernorm",
    "model.layers.5.input_layernorm",
    "model.layers.7.post_attention_layernorm",
    "model.layers.10.mlp.down_proj",
    "model.layers.12.self_attn.o_proj",
    "model.norm",
]


def texts(name: str, count: int = 16) -> list[str]:
    return files("actsteer").joinpath(f"data/{name}.txt").read_text().splitlines()[:count]


def model_folder() -> str:
    return str(_cached_alias("smollm2-135m"))


def hf_greedy(smol, prompt_ids: list[int], applied=()) -> tuple[list[int], list[float]]:
    """HF's greedy continuation of a prompt (TOKENS tokens, EOS suppressed like vLLM's
    min_tokens) under actsteer's hooks, and each chosen token's log-probability."""
    model, _ = smol
    ids = torch.tensor([prompt_ids])
    with actsteer.steered(model, *applied), torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=TOKENS,
            min_new_tokens=TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    logprobs = [
        torch.log_softmax(step[0].float(), -1)[token].item()
        for step, token in zip(out.logits, tokens, strict=True)
    ]
    return tokens, logprobs


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two continuations share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run(llm, prompts: list[list[int]], extras: list) -> list[tuple[list[int], list[float]]]:
    """Greedy TOKENS tokens per prompt in one vLLM generate call, each with its own
    extra_args: (tokens, each chosen token's log-probability) per prompt."""
    import vllm

    params = [
        vllm.SamplingParams(
            temperature=0, max_tokens=TOKENS, min_tokens=TOKENS, logprobs=0, extra_args=extra
        )
        for extra in extras
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    found = []
    for out in outputs:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        found.append(
            (tokens, [lp[t].logprob for lp, t in zip(completion.logprobs, tokens, strict=True)])
        )
    return found
