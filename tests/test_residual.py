"""The `residual` preset: decoder block outputs (the residual stream) recorded, steered, fitted
sequentially and folded where a shift can be folded exactly, on tiny config-built models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Qwen2Config

import actsteer
from actsteer.capture import record, resolve_modules
from actsteer.families import FAMILIES
from actsteer.maps import AffineMap
from actsteer.steering import SteeringInfo
from tests.test_sequential import reference_sequential

PROMPTS = ["The weather today is", "I think that the best way to"]


def logits(model, tok) -> torch.Tensor:
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**enc).logits


def shift_steering(model, names, seed=0) -> actsteer.Steering:
    """ω = 1 and a random β per block: what Mean-AcT, ActAdd and ITI-c produce."""
    torch.manual_seed(seed)
    width = model.config.hidden_size
    maps = {n: AffineMap(torch.ones(width), torch.randn(width)) for n in names}
    return actsteer.Steering(maps, SteeringInfo(method="mean-act", support="all"))


def tiny(config_class, tokenizer):
    torch.manual_seed(0)
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def test_every_lm_family_has_the_preset(tiny_llama, tiny_gpt2):
    assert all("residual" in f.presets for f in FAMILIES if f.name != "diffusion")
    assert resolve_modules(tiny_llama, "residual") == [f"model.layers.{i}" for i in range(3)]
    assert resolve_modules(tiny_gpt2, "residual") == ["transformer.h.0", "transformer.h.1"]


def test_recorded_block_outputs_are_the_hidden_states(tiny_llama, tokenizer, neutral):
    names = resolve_modules(tiny_llama, "residual")
    samples = record(tiny_llama, tokenizer, neutral[:3], names, pooling="all", progress=False)
    enc = tokenizer(neutral[:3], return_tensors="pt", padding=True)
    with torch.inference_mode():
        hidden = tiny_llama(**enc, output_hidden_states=True).hidden_states
    mask = enc["attention_mask"].bool()
    for k in range(2):  # the last entry of hidden_states is after the final norm
        torch.testing.assert_close(samples[names[k]], hidden[k + 1][mask])


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_hooks_add_the_shift_to_each_block_output(model_name, tokenizer, request):
    model = request.getfixturevalue(model_name)
    names = resolve_modules(model, "residual")
    steering = shift_steering(model, names)
    lookup = dict(model.named_modules())

    def adder(shift):
        return lambda module, args, output: (
            (output[0] + shift, *output[1:]) if isinstance(output, tuple) else output + shift
        )

    handles = [lookup[n].register_forward_hook(adder(0.5 * steering.maps[n].beta)) for n in names]
    try:
        by_hand = logits(model, tokenizer)
    finally:
        for handle in handles:
            handle.remove()
    with steering.applied(model, 0.5):
        hooked = logits(model, tokenizer)
    plain = logits(model, tokenizer)
    assert (hooked - plain).abs().max() > 1e-2
    torch.testing.assert_close(hooked, by_hand, rtol=1e-5, atol=1e-5)
    with steering.applied(model, 0.0):
        assert torch.equal(logits(model, tokenizer), plain)


def test_fit_on_the_residual_stream_moves_its_mean(tiny_llama, tokenizer, neutral, football):
    steering = actsteer.fit(
        tiny_llama, tokenizer, neutral[:20], football[:20], modules="residual",
        method="mean-act", progress=False,
    )  # fmt: skip
    name = "model.layers.0"  # the first block: nothing upstream is steered
    source = record(tiny_llama, tokenizer, neutral[:20], [name], progress=False)[name]
    target = record(tiny_llama, tokenizer, football[:20], [name], progress=False)[name]
    torch.testing.assert_close(
        steering.maps[name].beta, target.mean(0) - source.mean(0), rtol=1e-4, atol=1e-5
    )


def test_sequential_fit_on_blocks_equals_the_slow_reference(
    tiny_llama, tokenizer, neutral, football
):
    source, target = neutral[:30], football[:30]
    names = resolve_modules(tiny_llama, "residual")
    expected = reference_sequential(tiny_llama, tokenizer, source, target, names, "all")
    fitted = actsteer.fit(
        tiny_llama, tokenizer, source, target, modules="residual", mode="sequential",
        support="all", progress=False,
    )  # fmt: skip
    for name in names:
        torch.testing.assert_close(
            fitted.maps[name].beta, expected[name].beta, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_a_shift_of_block_outputs_folds_exactly(model_name, tokenizer, request, tmp_path):
    model = request.getfixturevalue(model_name)
    exact = copy.deepcopy(model).double()
    names = resolve_modules(exact, "residual")
    steering = shift_steering(exact, names)
    with steering.applied(exact, 0.7, "all"):
        hooked = logits(exact, tokenizer)
    assert (hooked - logits(exact, tokenizer)).abs().max() > 1e-2
    steering.fold(exact, 0.7, "all")
    assert (logits(exact, tokenizer) - hooked).abs().max() < 1e-8
    exact.float().save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(fresh, tokenizer) - hooked.float()).abs().max() < 1e-4


def test_a_writer_map_and_a_block_shift_fold_together(tiny_llama, tokenizer):
    """The block's shift goes into down_proj's bias after down_proj's own map has scaled it."""
    exact = copy.deepcopy(tiny_llama).double()
    torch.manual_seed(1)
    maps = {
        "model.layers.1.mlp.down_proj": AffineMap(torch.rand(32) + 0.5, torch.randn(32)),
        "model.layers.1": AffineMap(torch.ones(32), torch.randn(32)),
    }
    steering = actsteer.Steering(maps, SteeringInfo(method="linear-act"))
    with steering.applied(exact, 0.6, "all"):
        hooked = logits(exact, tokenizer)
    steering.fold(exact, 0.6, "all")
    assert (logits(exact, tokenizer) - hooked).abs().max() < 1e-8


def test_unfoldable_block_maps_are_refused_and_leave_the_weights(tiny_llama, tokenizer):
    tiny_llama = copy.deepcopy(tiny_llama)  # the shared model may carry other tests' folds
    tiny_llama.config.mlp_bias = False
    names = resolve_modules(tiny_llama, "residual")
    scaled = shift_steering(tiny_llama, names)
    scaled.maps[names[1]].omega[3] = 1.5
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(actsteer.ActSteerError, match=r"scales 1 unit\(s\) of the residual stream"):
        scaled.fold(tiny_llama, 1.0, "all")
    after = tiny_llama.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not tiny_llama.config.mlp_bias


@pytest.mark.parametrize(
    ("config_class", "message"),
    [
        (Gemma2Config, "comes out of a norm without a bias"),
        (Qwen2Config, "offers no config flag"),
    ],
)
def test_families_without_a_bias_for_the_shift_refuse_it(config_class, message, tokenizer):
    model = tiny(config_class, tokenizer)
    steering = shift_steering(model, resolve_modules(model, "residual"))
    plain = logits(model, tokenizer)
    with steering.applied(model, 1.0):  # hooks steer these blocks; only the fold is refused
        assert (logits(model, tokenizer) - plain).abs().max() > 1e-2
    with pytest.raises(actsteer.ActSteerError, match=message):
        steering.fold(model, 1.0, "all")
