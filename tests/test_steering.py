"""Fitting and applying steerings on the real SmolLM2-135M model."""

from __future__ import annotations

import pytest
import torch

import actsteer
from actsteer.capture import record, resolve_modules

PROMPTS = ["I went to the park and", "The weather today is", "My favourite food is"]


def logits(model, tok, prompts=PROMPTS) -> torch.Tensor:
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**enc).logits


@pytest.fixture(scope="module")
def independent(smol, neutral, football):
    model, tok = smol
    return actsteer.fit(model, tok, neutral, football, modules="post-attn-ln", progress=False)


@pytest.fixture(scope="module")
def sequential(smol, neutral, football):
    model, tok = smol
    return actsteer.fit(
        model,
        tok,
        neutral,
        football,
        modules="post-attn-ln",
        mode="sequential",
        support="all",
        progress=False,
    )


def test_zero_strength_is_bit_identical_and_exit_restores_the_model(smol, independent):
    model, tok = smol
    plain = logits(model, tok)
    with independent.applied(model, strength=0.0):
        assert torch.equal(logits(model, tok), plain)
    with independent.applied(model, strength=1.0) as handle:
        assert not torch.allclose(logits(model, tok), plain)
        handle.set_strength(0.0)
        assert torch.equal(logits(model, tok), plain)
    assert torch.equal(logits(model, tok), plain)


def test_hooks_are_removed_on_error(smol, independent):
    model, tok = smol
    plain = logits(model, tok)
    with pytest.raises(RuntimeError, match="boom"), independent.applied(model, 1.0):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, tok), plain)
    assert all(not m._forward_hooks for m in model.modules())


def _stats(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return samples.mean(0), samples.std(0)


def _transported_matches_target(model, tok, steering, source, target, modules, target_under=None):
    """Mean-pooled source activations under λ=1 (support all) against the target's (on the plain
    model, or under the steering `target_under`)."""
    if target_under is None:
        wanted = record(model, tok, target, modules, progress=False)
    else:
        with target_under.applied(model, strength=1.0, support="all"):
            wanted = record(model, tok, target, modules, progress=False)
    with steering.applied(model, strength=1.0, support="all"):
        moved = record(model, tok, source, modules, progress=False)
    for name in modules:
        (m_moved, s_moved), (m_target, s_target) = _stats(moved[name]), _stats(wanted[name])
        scale = s_target.mean()
        # Means: the map sends the source mean exactly onto the target mean (float error only).
        assert (m_moved - m_target).abs().max() < 1e-3 * scale + 1e-4, name
        # Spreads: ω σ_s = ρ σ_t with ρ the correlation of the sorted coupling (close to 1).
        ratio = s_moved / s_target
        assert (ratio.median() - 1).abs() < 0.05, name
        assert ((ratio - 1).abs() < 0.2).float().mean() > 0.95, name


def test_independent_fit_moves_the_first_module_onto_the_target(
    smol, independent, neutral, football
):
    model, tok = smol
    first = independent.modules[:1]
    _transported_matches_target(model, tok, independent, neutral, football, first)


def test_sequential_fit_moves_every_module_onto_the_target(smol, sequential, neutral, football):
    """The causal estimator's promise at module k: with the maps of modules up to k applied, the
    source at k lands on the target at k as the maps of the modules before k leave it."""
    model, tok = smol
    modules = sequential.modules
    for k in (0, len(modules) // 2, len(modules) - 1):
        upstream = actsteer.Steering({n: sequential.maps[n] for n in modules[:k]})
        with_k = actsteer.Steering({n: sequential.maps[n] for n in modules[: k + 1]})
        _transported_matches_target(
            model, tok, with_k, neutral, football, modules[k : k + 1], target_under=upstream
        )


def test_sequential_differs_from_independent_downstream(smol, independent, sequential):
    first, last = independent.modules[0], independent.modules[-1]
    assert torch.allclose(independent.maps[first].omega, sequential.maps[first].omega, atol=1e-5)
    assert not torch.allclose(independent.maps[last].omega, sequential.maps[last].omega, atol=1e-3)


def test_per_row_strength_equals_rows_one_at_a_time(smol, independent):
    model, tok = smol
    strengths = torch.tensor([0.0, 0.5, 1.0])
    enc = tok(["The weather today is"] * 3, return_tensors="pt", padding=True)
    with torch.inference_mode(), independent.applied(model, strength=strengths):
        together = model(**enc).logits
    for row, lam in enumerate(strengths.tolist()):
        with torch.inference_mode(), independent.applied(model, strength=lam):
            alone = model(**{k: v[row : row + 1] for k, v in enc.items()}).logits
        assert torch.allclose(together[row], alone[0], atol=1e-4), lam


def test_per_row_strength_of_the_wrong_length_is_a_clear_error(smol, independent):
    model, tok = smol
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with (
        pytest.raises(actsteer.ActSteerError, match="has 2 values but the batch has 3 rows"),
        torch.inference_mode(),
        independent.applied(model, torch.tensor([0.5, 1.0])),
    ):
        model(**enc)


def test_strength_out_of_range_is_a_clear_error(smol, independent):
    model, _ = smol
    for bad in (1.5, -0.1, torch.tensor([0.2, 2.0]), float("nan")):
        with pytest.raises(actsteer.ActSteerError, match="strength"):
            independent.attach(model, bad)


def test_layernorm_preset_covers_every_norm(smol):
    model, _ = smol
    assert len(resolve_modules(model, "layernorms")) == 2 * 30 + 1
