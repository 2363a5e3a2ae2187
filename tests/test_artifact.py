"""Saving and loading steerings: round trip, foreign models, damaged files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import actsteer
from actsteer import ActSteerError, Steering

TEXTS_A = [f"a calm sentence about the garden, number {i}" for i in range(8)]
TEXTS_B = [f"an angry sentence about the traffic jam, number {i}" for i in range(8)]


@pytest.fixture(scope="module")
def tiny_steering(tiny_llama, tokenizer) -> Steering:
    return actsteer.fit(
        tiny_llama, tokenizer, TEXTS_A, TEXTS_B, modules="layernorms", progress=False
    )


@pytest.fixture()
def saved(tiny_steering, tmp_path):
    return tiny_steering.save(tmp_path / "steer.safetensors")


def test_round_trip_keeps_maps_info_and_outputs(tiny_llama, tokenizer, tiny_steering, saved):
    loaded = Steering.load(saved)
    assert loaded.modules == tiny_steering.modules
    assert loaded.info == tiny_steering.info
    for name, amap in tiny_steering.maps.items():
        assert torch.equal(loaded.maps[name].omega, amap.omega)
        assert torch.equal(loaded.maps[name].beta, amap.beta)
        assert set(loaded.maps[name].bounds) == {"q0-100", "q1-99", "q5-95"}
    enc = tokenizer(TEXTS_A[:3], return_tensors="pt", padding=True)
    outputs = []
    for steering in (tiny_steering, loaded):
        with torch.inference_mode(), steering.applied(tiny_llama, strength=0.7, support="q1-99"):
            outputs.append(tiny_llama(**enc).logits)
    assert torch.equal(*outputs)


def test_header_describes_the_steering(saved):
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as f:
        header = json.loads(f.metadata()["actsteer"])
    assert header["method"] == "linear-act" and header["format_version"] == 1
    assert header["pooling"] == "mean" and header["data"]["source_texts"] == 8
    assert header["modules"][0] == "model.layers.0.input_layernorm"
    assert any(p.startswith("model.embed_tokens.weight:") for p in header["model"]["fingerprint"])


def test_loading_onto_another_model_names_the_first_mismatch(smol, tiny_llama, saved):
    model, _ = smol
    with pytest.raises(ActSteerError, match=r"'model\.layers\.0\.input_layernorm' has 32 units"):
        Steering.load(saved).attach(model)
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tiny_llama.config.vocab_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ActSteerError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight'.*64x32"):
        Steering.load(saved).attach(other)
    fewer = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tiny_llama.config.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(
        ActSteerError,
        match=r"module 'model\.layers\.2\.input_layernorm', which this model does not have",
    ):
        Steering.load(saved).attach(fewer)


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) - 50]
    elif how == "flipped":
        data[-20] ^= 0xFF
    elif how == "garbage":
        data = bytearray(b"this is not a safetensors file at all")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped", "garbage"])
def test_damaged_files_are_refused(saved, how):
    _damage(saved, how)
    with pytest.raises(ActSteerError, match="not a readable actsteer steering file"):
        Steering.load(saved)


def test_foreign_and_missing_files_are_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ActSteerError, match="no actsteer metadata"):
        Steering.load(plain)
    with pytest.raises(ActSteerError, match="no steering file"):
        Steering.load(tmp_path / "missing.safetensors")


def test_newer_format_asks_for_an_upgrade(tiny_steering, tmp_path):
    path = tiny_steering.save(tmp_path / "s.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["actsteer"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    header["format_version"] = 99
    save_file(tensors, str(path), metadata={"actsteer": json.dumps(header)})
    with pytest.raises(ActSteerError, match="upgrade actsteer"):
        Steering.load(path)


def test_inverse_steering_undoes_the_steering(tiny_llama, tokenizer, tiny_steering):
    """Inverse maps on every module: applying T then T⁻¹ at one module is the identity."""
    name = tiny_steering.modules[0]
    amap, inverse = tiny_steering.maps[name], tiny_steering.inverse().maps[name]
    a = torch.randn(4, amap.dim)
    assert torch.allclose(inverse(amap(a, 1.0, "all"), 1.0, "all"), a, atol=1e-4)
    assert tiny_steering.inverse().info.inverted is True
