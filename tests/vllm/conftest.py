"""Fixtures of the vLLM plugin's tests (run by `make test-vllm` in .venv-vllm): steerings
fitted on the real SmolLM2 with the Hugging Face model."""

from __future__ import annotations

import dataclasses

import pytest

import actsteer
from tests.vllm.reference import MIXED_MODULES, texts


@pytest.fixture(scope="session")
def steering_files(smol, tmp_path_factory):
    """Steerings that induce football talk in neutral text: 'football', Linear-AcT on
    post-attn-ln, and 'mixed', Mean-AcT on MIXED_MODULES, both with support "all" (continuous
    maps); 'bounded', the 'football' maps with support q0-100."""
    model, tok = smol
    folder = tmp_path_factory.mktemp("steerings")
    neutral, football = texts("neutral"), texts("football")
    linear = actsteer.fit(model, tok, source=neutral, target=football, modules="post-attn-ln")
    mean = actsteer.fit(
        model, tok, source=neutral, target=football, modules=MIXED_MODULES, method="mean-act"
    )
    fits = {
        "football": dataclasses.replace(
            linear, info=dataclasses.replace(linear.info, support="all")
        ),
        "mixed": dataclasses.replace(mean, info=dataclasses.replace(mean.info, support="all")),
        "bounded": dataclasses.replace(
            linear, info=dataclasses.replace(linear.info, support="q0-100")
        ),
    }
    fits["gated"] = fits["football"].with_gate(model, tok, neutral, football, "token")
    paths = {}
    for name, steering in fits.items():
        paths[name] = folder / f"{name}.safetensors"
        steering.save(paths[name])
    return paths


@pytest.fixture(scope="session")
def steerings(steering_files):
    return {name: actsteer.Steering.load(path) for name, path in steering_files.items()}
