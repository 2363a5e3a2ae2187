"""A big model dispatched by accelerate: half of SmolLM2's layers offloaded to disk (their
parameters on `meta` until a forward moves them in) is captured, fitted and steered exactly as
the same model undispatched."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import dispatch_model

import actsteer
from actsteer.capture import record, resolve_modules

pytestmark = pytest.mark.slow

MODULES = r"model\.layers\.(?:3|14|15|22|29)\.(?:post_attention_layernorm|self_attn\.o_proj)"


@pytest.fixture(scope="module")
def offloaded(smol, tmp_path_factory):
    """SmolLM2 with layers 15–29 offloaded to disk by accelerate."""
    model, _ = smol
    layers = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu"}
    device_map |= {f"model.layers.{i}": "cpu" if i < layers // 2 else "disk" for i in range(layers)}
    device_map["lm_head"] = "cpu"
    dispatched = dispatch_model(
        copy.deepcopy(model), device_map, offload_dir=str(tmp_path_factory.mktemp("offload"))
    )
    assert dispatched.model.layers[layers - 1].mlp.down_proj.weight.device.type == "meta"
    return dispatched


def test_capture_fit_and_apply_match_the_undispatched_model(smol, offloaded, neutral, football):
    model, tok = smol
    names = resolve_modules(model, MODULES)
    texts = neutral[:12]
    plain = record(model, tok, texts, names, progress=False)
    dispatched = record(offloaded, tok, texts, names, progress=False)
    for name in names:
        torch.testing.assert_close(dispatched[name], plain[name], rtol=1e-5, atol=1e-5)

    settings = dict(source=neutral[:24], target=football[:24], modules=MODULES, progress=False)
    steering = actsteer.fit(model, tok, **settings)
    offloaded_fit = actsteer.fit(offloaded, tok, **settings)
    for name in names:
        torch.testing.assert_close(offloaded_fit.maps[name].omega, steering.maps[name].omega)
        torch.testing.assert_close(offloaded_fit.maps[name].beta, steering.maps[name].beta)

    ids = tok(["I went to the park and"], return_tensors="pt")
    with torch.inference_mode():
        untouched = model(**ids).logits
        for support in ("q0-100", "all"):
            with steering.applied(model, 1.0, support):
                expected = model(**ids).logits
            with steering.applied(offloaded, 1.0, support):
                got = offloaded(**ids).logits
            assert (expected - untouched).abs().max() > 1e-3, "the steering moves the logits"
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
