"""Presets, fitting and steering on tiny config-built models of each supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    Qwen2Config,
    Qwen3Config,
)

import actsteer
from actsteer.capture import resolve_modules

LAYERS = 2
SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
)
#: family config, norms per decoder layer (Gemma 2/3 have four)
FAMILIES = {
    "qwen2": (Qwen2Config, 2),
    "qwen3": (Qwen3Config, 2),
    "gemma2": (Gemma2Config, 4),
    "gemma3_text": (Gemma3TextConfig, 4),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tokenizer):
    config_class, norms = FAMILIES[request.param]
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **SHAPE)
    return AutoModelForCausalLM.from_config(config).eval(), norms


def test_presets_select_one_module_per_layer_and_every_norm(family_model):
    model, norms = family_model
    for preset, suffix in [
        ("post-attn-ln", "post_attention_layernorm"),
        ("attn-out", "self_attn.o_proj"),
        ("mlp-out", "mlp.down_proj"),
    ]:
        assert resolve_modules(model, preset) == [
            f"model.layers.{i}.{suffix}" for i in range(LAYERS)
        ]
    layernorms = resolve_modules(model, "layernorms")
    assert len(layernorms) == LAYERS * norms + 1 and layernorms[-1] == "model.norm"


def test_fit_and_steer_on_each_family(family_model, tokenizer, neutral, football):
    model, _ = family_model
    steering = actsteer.fit(
        model, tokenizer, neutral[:24], football[:24], modules="layernorms", progress=False
    )
    prompts = ["The weather today is", "My favourite food"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        plain = model(**enc).logits
        with steering.applied(model, 0.0):
            zero = model(**enc).logits
        with steering.applied(model, 1.0, support="all"):
            full = model(**enc).logits
    assert torch.equal(zero, plain)
    assert not torch.allclose(full, plain, atol=1e-3)
