"""Shared fixtures: the real built-in model, its tokenizer, tiny config-built models, texts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import actsteer
from actsteer.models import _cached_alias
from actsteer.texts import package_texts


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    """Mark `slow` every test that loads the real SmolLM2: it needs the `smol` fixture, directly
    or through another fixture (`fixturenames` is the whole closure). Tests that load it
    otherwise carry the mark themselves (`pytestmark = pytest.mark.slow`)."""
    for item in items:
        if "smol" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smol():
    """The real SmolLM2-135M-Instruct (float32, CPU) and its tokenizer."""
    return actsteer.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, also used to feed the tiny models."""
    tok = AutoTokenizer.from_pretrained(_cached_alias("smollm2-135m"))
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def _tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama(tokenizer) -> LlamaForCausalLM:
    """A random 3-layer Llama built from a config, sharing SmolLM2's vocabulary."""
    return _tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_gpt2(tokenizer) -> GPT2LMHeadModel:
    """A random 2-layer GPT-2 built from a config."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def neutral() -> list[str]:
    return package_texts("neutral")


@pytest.fixture(scope="session")
def football() -> list[str]:
    return package_texts("football")
