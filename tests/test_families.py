"""Presets, fitting and steering on tiny config-built models of each supported family."""

from __future__ import annotations

import copy
import dataclasses

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
from actsteer import fold
from actsteer.capture import resolve_modules
from actsteer.choices import DEFAULT_MODULES
from actsteer.families import family_of, find_family
from actsteer.maps import AffineMap

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


def test_every_family_names_its_presets_and_known_types_resolve(family_model):
    model, _ = family_model
    family = find_family(model)
    assert family is not None and DEFAULT_MODULES in family.presets
    assert family is family_of(model, "a test")


def test_a_model_type_missing_from_the_table_is_a_clear_error(tiny_llama):
    unknown = copy.deepcopy(tiny_llama)
    unknown.config.model_type = "brand-new-arch"
    with pytest.raises(actsteer.ActSteerError, match="'brand-new-arch' is not in actsteer's"):
        family_of(unknown, "folding")
    with pytest.raises(actsteer.ActSteerError, match="preset 'post-attn-ln' is not defined"):
        resolve_modules(unknown, "post-attn-ln")
    steering = actsteer.Steering(
        {"model.layers.0.post_attention_layernorm": AffineMap(torch.ones(32), torch.ones(32))}
    )
    with pytest.raises(actsteer.ActSteerError, match="folding needs to know the architecture"):
        steering.fold(unknown, 1.0, support="all")


def test_a_fold_the_hooks_disagree_with_is_refused_and_undone(family_model, monkeypatch):
    """With a wrong family entry (the (1 + γ) offset of Gemma's norms dropped, or a norm's
    readers forgotten), the probe catches the folded model computing something else; the
    weights are restored."""
    model, _ = family_model
    family = find_family(model)
    assert family is not None
    g = torch.Generator().manual_seed(0)
    maps = {
        f"model.layers.{i}.input_layernorm": AffineMap(
            1 + 0.3 * torch.rand(32, generator=g), 0.2 * torch.randn(32, generator=g)
        )
        for i in range(LAYERS)
    }  # their shifts fold into q, k, v biases (the attention_bias flag) in every family here
    steering = actsteer.Steering(maps)
    before = copy.deepcopy(model.state_dict())
    wrong = dataclasses.replace(
        family,
        norm_offset=1.0 - family.norm_offset,  # Gemma's (1 + γ) taken for γ, or the reverse
    )
    monkeypatch.setattr(fold, "family_of", lambda tree, needed_for: wrong)
    target = copy.deepcopy(model)
    with pytest.raises(actsteer.ActSteerError, match="do not reproduce the hooked model"):
        steering.fold(target, 1.0, support="all")
    after = target.state_dict()
    assert after.keys() == before.keys(), "biases added by the fold are gone again"
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert getattr(target.config, "attention_bias", None) == getattr(
        model.config, "attention_bias", None
    )
    monkeypatch.undo()
    folded = steering.fold(copy.deepcopy(model), 1.0, support="all")  # the right entry folds
    assert any(not torch.equal(folded.state_dict()[k], before[k]) for k in before)


def test_a_fold_that_fails_half_way_leaves_the_weights_unchanged(family_model):
    """Shifts after the post-attention norm need MLP biases; where the architecture has no flag
    for them the fold stops, after it had already edited earlier modules: all undone."""
    model, _ = family_model
    family = find_family(model)
    assert family is not None
    names = [n for n in resolve_modules(model, "layernorms") if not n.endswith("model.norm")]
    maps = {n: AffineMap(torch.full((32,), 1.1), torch.full((32,), 0.1)) for n in names}
    target = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(actsteer.ActSteerError, match="cannot be folded|needs a bias"):
        actsteer.Steering(maps).fold(target, 1.0, support="all")
    after = target.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
