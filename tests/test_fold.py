"""Folding steerings into weights: exported checkpoints load in stock transformers and match."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import actsteer
from actsteer.export import export

PROMPTS = ["The weather today is", "I think that the best way to"]
LLAMA_MODULES = (
    r"model\.layers\.\d+\."
    r"(input_layernorm|post_attention_layernorm|self_attn\.o_proj|mlp\.down_proj)"
)


def logits(model, tok) -> torch.Tensor:
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**enc).logits


def check_export_matches_hooks(
    model, tok, steering, tmp_path, strengths=(0.5, 1.0), tol=1e-4, exact_tol=1e-8
):
    """Exported float32 checkpoint, loaded fresh, against the hooked model; and exactness in
    float64, where rounding cannot hide a wrong fold."""
    for strength in strengths:
        with steering.applied(model, strength, support="all"):
            hooked = logits(model, tok)
        assert (hooked - logits(model, tok)).abs().max() > 1e-2, "the steering does something"
        folded = copy.deepcopy(model)
        export(steering, folded, tok, tmp_path / f"s{strength}", strength, support="all")
        del folded
        fresh = AutoModelForCausalLM.from_pretrained(tmp_path / f"s{strength}").eval()
        assert not any(m._forward_hooks for m in fresh.modules())
        assert (logits(fresh, tok) - hooked).abs().max() < tol, strength
        del fresh
        exact = copy.deepcopy(model).double()
        with steering.applied(exact, strength, support="all"):
            hooked64 = logits(exact, tok)
        steering.fold(exact, strength, support="all")
        assert (logits(exact, tok) - hooked64).abs().max() < exact_tol, strength


def test_gpt2_layernorms_and_linear_outputs(tiny_gpt2, tokenizer, neutral, football, tmp_path):
    steering = actsteer.fit(
        tiny_gpt2,
        tokenizer,
        neutral[:30],
        football[:30],
        modules=r"transformer\.(h\.\d+\.(ln_1|ln_2|attn\.c_proj|mlp\.c_proj)|ln_f)",
        progress=False,
    )
    check_export_matches_hooks(tiny_gpt2, tokenizer, steering, tmp_path)


def test_smollm2_rmsnorm_shift_moves_into_new_biases(smol, neutral, football, tmp_path):
    model, tok = smol
    steering = actsteer.fit(
        model, tok, neutral[:40], football[:40], modules=LLAMA_MODULES, progress=False
    )
    # float32 rounding alone moves this 30-layer model's logits by up to 2.3e-4 (plain model,
    # float32 vs float64); folding reorders float32 operations, hence the float32 tolerance.
    check_export_matches_hooks(model, tok, steering, tmp_path, tol=5e-4)
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "s1.0").config
    assert config.attention_bias and config.mlp_bias


@pytest.fixture(scope="module")
def gemma():
    return actsteer.load_model("gemma3-270m")


def test_gemma_one_plus_gamma_rmsnorm(gemma, neutral, football, tmp_path):
    model, tok = gemma
    steering = actsteer.fit(
        model,
        tok,
        neutral[:24],
        football[:24],
        modules=r"model\.layers\.\d+\.(input_layernorm|self_attn\.o_proj)",
        progress=False,
    )
    # Gemma's RMSNorm computes in float32 even inside a float64 model: no float64 exactness.
    check_export_matches_hooks(model, tok, steering, tmp_path, (0.7,), tol=5e-4, exact_tol=2e-4)
    scale_only = actsteer.fit(
        model,
        tok,
        neutral[:24],
        football[:24],
        modules="post-attn-ln",
        method="aura",
        progress=False,
    )
    check_export_matches_hooks(model, tok, scale_only, tmp_path / "a", (1.0,), 5e-4, 2e-4)


def test_refusals_are_clear(smol, gemma, neutral, football):
    model, tok = smol
    steering = actsteer.fit(
        model, tok, neutral[:10], football[:10], modules="layernorms", progress=False
    )
    target = copy.deepcopy(model)
    with pytest.raises(actsteer.ActSteerError, match="support 'q0-100'.*cannot be folded"):
        steering.fold(target, 1.0)
    with pytest.raises(actsteer.ActSteerError, match="'model.norm' cannot be folded"):
        steering.fold(target, 1.0, support="all")
    with pytest.raises(actsteer.ActSteerError, match="one number"):
        steering.fold(target, torch.tensor([0.5, 1.0]), support="all")
    g_model, g_tok = gemma
    post = actsteer.fit(
        g_model, g_tok, neutral[:10], football[:10], modules="post-attn-ln", progress=False
    )
    with pytest.raises(actsteer.ActSteerError, match="post_attention_layernorm' cannot be folded"):
        post.fold(copy.deepcopy(g_model), 1.0, support="all")
