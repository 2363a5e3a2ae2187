"""Where steering acts: token positions under generate's KV cache, and composition."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import actsteer
from actsteer import Steering, SteeringInfo, steered
from actsteer.maps import AffineMap
from actsteer.models import cache_keyword

TEXTS_A = [f"a calm sentence about the garden, number {i}" for i in range(8)]
TEXTS_B = [f"an angry sentence about the traffic jam, number {i}" for i in range(8)]
PROMPT = ["The quick brown fox jumps over", "Hello there"]


@pytest.fixture(scope="module")
def steering(tiny_llama, tokenizer) -> Steering:
    return actsteer.fit(
        tiny_llama, tokenizer, TEXTS_A, TEXTS_B, modules="layernorms", support="all", progress=False
    )


def prompt_logits(model, tok, **apply) -> torch.Tensor:
    enc = tok(PROMPT, return_tensors="pt", padding=True)
    with torch.inference_mode():
        if not apply:
            return model(**enc).logits
        with apply.pop("steering").applied(model, **apply):
            return model(**enc).logits


def decode_step_logits(model, tok, steering=None, **apply) -> torch.Tensor:
    """One cached decoding step after an unsteered prompt pass."""
    enc = tok(PROMPT, return_tensors="pt", padding=True)
    with torch.inference_mode():
        cache = {cache_keyword(model): DynamicCache(config=model.config)}
        model(**enc, **cache, use_cache=True)
        step = torch.full((len(PROMPT), 1), 42)
        mask = torch.cat([enc["attention_mask"], torch.ones(len(PROMPT), 1, dtype=torch.long)], 1)
        if steering is None:
            return model(input_ids=step, attention_mask=mask, **cache).logits
        with steering.applied(model, **apply):
            return model(input_ids=step, attention_mask=mask, **cache).logits


def test_prompt_positions_steer_only_the_prompt_pass(tiny_llama, tokenizer, steering):
    plain = prompt_logits(tiny_llama, tokenizer)
    full = prompt_logits(tiny_llama, tokenizer, steering=steering, strength=1.0)
    assert not torch.allclose(plain, full)
    assert torch.equal(
        prompt_logits(tiny_llama, tokenizer, steering=steering, strength=1.0, positions="prompt"),
        full,
    )
    assert torch.equal(
        prompt_logits(
            tiny_llama, tokenizer, steering=steering, strength=1.0, positions="generated"
        ),
        plain,
    )


def test_generated_positions_steer_only_cached_steps(tiny_llama, tokenizer, steering):
    plain = decode_step_logits(tiny_llama, tokenizer)
    full = decode_step_logits(tiny_llama, tokenizer, steering, strength=1.0)
    assert not torch.allclose(plain, full)
    generated = decode_step_logits(
        tiny_llama, tokenizer, steering, strength=1.0, positions="generated"
    )
    assert torch.equal(generated, full)
    prompt_only = decode_step_logits(
        tiny_llama, tokenizer, steering, strength=1.0, positions="prompt"
    )
    assert torch.equal(prompt_only, plain)


def test_last_position_leaves_earlier_tokens_alone(tiny_llama, tokenizer, steering):
    plain = prompt_logits(tiny_llama, tokenizer)
    last = prompt_logits(tiny_llama, tokenizer, steering=steering, strength=1.0, positions="last")
    assert torch.allclose(last[:, :-1], plain[:, :-1], atol=1e-6), (
        "causal: earlier tokens unchanged"
    )
    assert not torch.allclose(last[:, -1], plain[:, -1])


def test_positions_work_inside_generate(tiny_llama, tokenizer, steering):
    """generate's prompt pass and its cached steps are told apart (the cache reaches the model
    as `cache` in newer transformers, `past_key_values` in older ones)."""
    enc = tokenizer(PROMPT, return_tensors="pt", padding=True)
    kwargs = dict(
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.inference_mode():
        plain = tiny_llama.generate(**enc, **kwargs).scores
        scores = {}
        for positions in ("all", "prompt", "generated", "last"):
            with steering.applied(tiny_llama, 1.0, positions=positions):
                scores[positions] = tiny_llama.generate(**enc, **kwargs).scores
    assert all(len(s) == len(plain) for s in scores.values())
    assert not torch.allclose(scores["all"][0], plain[0])
    assert torch.equal(scores["prompt"][0], scores["all"][0]), "prompt pass steered"
    assert torch.equal(scores["generated"][0], plain[0]), "prompt pass left alone"
    assert not torch.allclose(scores["generated"][1], plain[1]), "cached steps steered"
    assert not torch.allclose(scores["last"][0], plain[0]), "the last token steered"


def test_unknown_positions_is_a_clear_error(tiny_llama, steering):
    with pytest.raises(actsteer.ActSteerError, match="unknown positions 'first'"):
        steering.attach(tiny_llama, 1.0, positions="first")


def _composed(a: Steering, la: float, b: Steering, lb: float) -> Steering:
    """The single affine map equal to b∘a at strengths la, lb (support all)."""
    maps = {}
    for name in a.maps:
        sa, ca = 1 + la * (a.maps[name].omega - 1), la * a.maps[name].beta
        sb, cb = 1 + lb * (b.maps[name].omega - 1), lb * b.maps[name].beta
        maps[name] = AffineMap(sb * sa, sb * ca + cb)
    return Steering(maps, SteeringInfo(method="iti-c", support="all"))


def test_composition_applies_steerings_in_the_given_order(tiny_llama, tokenizer, steering):
    other = actsteer.fit(
        tiny_llama,
        tokenizer,
        TEXTS_B,
        TEXTS_A[:5],
        modules="layernorms",
        method="gaussian-act",
        support="all",
        progress=False,
    )
    enc = tokenizer(PROMPT, return_tensors="pt", padding=True)
    with torch.inference_mode():
        with steered(tiny_llama, (steering, 1.0), (other, 0.5)) as handles:
            together = tiny_llama(**enc).logits
            assert len(handles) == 2
        with _composed(steering, 1.0, other, 0.5).applied(tiny_llama, 1.0):
            expected = tiny_llama(**enc).logits
        with steered(tiny_llama, (other, 0.5), (steering, 1.0)):
            reversed_order = tiny_llama(**enc).logits
        plain = tiny_llama(**enc).logits
    assert torch.allclose(together, expected, atol=1e-4)
    assert not torch.allclose(together, reversed_order, atol=1e-4)
    assert torch.equal(plain, prompt_logits(tiny_llama, tokenizer)), "all hooks removed on exit"
