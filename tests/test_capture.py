"""Module selection and activation recording, on tiny config-built models."""

from __future__ import annotations

import pytest
import torch

import actsteer
from actsteer.capture import SampleBuffer, pool, record, resolve_modules
from actsteer.errors import ActSteerError

TEXTS = [
    "A short one.",
    "This sentence is quite a bit longer than the first one, with many more tokens in it.",
    "Medium length text here, friends.",
    "Hi",
    "The last of the texts talks about the weather in spring.",
]


@pytest.mark.parametrize(
    ("preset", "count"),
    [("post-attn-ln", 3), ("layernorms", 7), ("attn-out", 3), ("mlp-out", 3)],
)
def test_presets_resolve_on_llama(tiny_llama, preset, count):
    names = resolve_modules(tiny_llama, preset)
    assert len(names) == count
    assert "model.norm" in names if preset == "layernorms" else True


def test_presets_resolve_on_gpt2(tiny_gpt2):
    assert resolve_modules(tiny_gpt2, "post-attn-ln") == [
        "transformer.h.0.ln_2",
        "transformer.h.1.ln_2",
    ]
    assert resolve_modules(tiny_gpt2, "layernorms")[-1] == "transformer.ln_f"
    assert resolve_modules(tiny_gpt2, "mlp-out") == [
        f"transformer.h.{i}.mlp.c_proj" for i in (0, 1)
    ]


def test_regex_is_a_full_match_in_model_order(tiny_llama):
    names = resolve_modules(tiny_llama, r"model\.layers\.[02]\.mlp\.down_proj")
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert resolve_modules(tiny_llama, ["model.norm", "model.layers.1.input_layernorm"]) == [
        "model.layers.1.input_layernorm",
        "model.norm",
    ]


def test_pattern_matching_nothing_lists_existing_names(tiny_llama):
    with pytest.raises(ActSteerError, match=r"matches no module.*model\.layers\.\*\.mlp"):
        resolve_modules(tiny_llama, r"transformer\.h\.\d+\.ln_2")
    with pytest.raises(ActSteerError, match="does not exist"):
        resolve_modules(tiny_llama, ["model.layers.9.mlp"])
    with pytest.raises(ActSteerError, match="not a valid regex"):
        resolve_modules(tiny_llama, "model.(")


def test_pooling_ignores_padding_on_either_side():
    real = torch.randn(2, 3, 4)
    garbage = torch.full((2, 2, 4), 1e6)
    right = torch.cat([real, garbage], dim=1)
    left = torch.cat([garbage, real], dim=1)
    right_mask = torch.tensor([[1, 1, 1, 0, 0]] * 2).bool()
    left_mask = right_mask.flip(1)
    for pooling, expected in (
        ("mean", real.mean(1)),
        ("last", real[:, -1]),
        ("max", real.amax(1)),
        ("all", real.reshape(6, 4)),
    ):
        assert torch.allclose(pool(right, right_mask, pooling), expected, atol=1e-6)
        assert torch.allclose(pool(left, left_mask, pooling), expected, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "last", "max", "all"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_recording_equals_one_text_at_a_time(tiny_llama, tokenizer, pooling, side):
    tokenizer.padding_side = side
    modules = resolve_modules(tiny_llama, "layernorms")
    batched = record(
        tiny_llama, tokenizer, TEXTS, modules, pooling=pooling, batch_size=5, progress=False
    )
    single = record(
        tiny_llama, tokenizer, TEXTS, modules, pooling=pooling, batch_size=1, progress=False
    )
    for name in modules:
        assert torch.allclose(batched[name], single[name], atol=1e-5), name
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert batched[modules[0]].shape[0] == (tokens if pooling == "all" else len(TEXTS))


def test_max_length_truncates(tiny_llama, tokenizer):
    samples = record(
        tiny_llama, tokenizer, TEXTS, ["model.norm"], pooling="all", max_length=4, progress=False
    )
    assert samples["model.norm"].shape[0] == sum(
        min(4, len(tokenizer(t)["input_ids"])) for t in TEXTS
    )


def test_sample_buffer_cap_keeps_a_uniform_subset():
    buffer = SampleBuffer(cap=100, seed=0)
    for start in range(0, 10_000, 500):
        buffer.add(torch.arange(start, start + 500, dtype=torch.float32).unsqueeze(1))
    kept = buffer.samples()
    assert kept.shape == (100, 1)
    assert len(kept.unique()) == 100
    assert 3000 < kept.mean() < 7000, "a uniform subset of 0..9999, not the first or last rows"


def test_all_pooling_stays_within_budget(tiny_llama, tokenizer):
    texts = [f"sentence number {i} with a few more words in it" for i in range(200)]
    samples = record(
        tiny_llama, tokenizer, texts, ["model.norm"], pooling="all", budget_mb=0.001, progress=False
    )
    assert samples["model.norm"].shape[0] == 1000, "capped at the minimum of 1000 samples"


def test_too_few_texts_are_clear_errors(tiny_llama, tokenizer):
    for source in ([], ["only one sentence"], ["", "   ", "one"]):
        with pytest.raises(ActSteerError, match="at least 2"):
            actsteer.fit(
                tiny_llama, tokenizer, source, TEXTS, modules="post-attn-ln", progress=False
            )
    with pytest.raises(ActSteerError, match="not one string"):
        actsteer.fit(tiny_llama, tokenizer, "a string", TEXTS, progress=False)


def test_nan_activations_are_a_clear_error(tokenizer):
    from tests.conftest import _tiny_llama

    model = _tiny_llama(len(tokenizer))
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    with pytest.raises(
        ActSteerError, match=r"NaN.*layers\.1\.post_attention_layernorm|layers\.1.*NaN"
    ):
        actsteer.fit(model, tokenizer, TEXTS, TEXTS[1:], modules="post-attn-ln", progress=False)
