"""Steering a compiled model (actsteer.compiled): torch.compile traces the steering's hooks.

Without care a steering applied to a compiled model does nothing (torch.compile does not guard
on hooks), and one removed keeps steering. Here: compiled steered logits equal eager steered
ones to float32 rounding at one λ, at one per row and with a token gate; changing λ compiles
nothing new; λ = 0 is the compiled plain model bit for bit; removing the steering gives the
plain model back; a model compiled while steered switches to traced hooks; what traced hooks
cannot carry is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import actsteer
from actsteer import ActSteerError

MODULES = "post-attn-ln"


@pytest.fixture
def model(tiny_llama):
    """A fresh copy of the tiny Llama (compiling replaces its forward), compiled code reset
    after the test."""
    torch.compiler.reset()
    yield copy.deepcopy(tiny_llama)
    torch.compiler.reset()


@pytest.fixture(scope="module", params=["linear-act", "quantile-act", "joint-act"])
def steering(request, tiny_llama, tokenizer, neutral, football):
    """An affine, a piecewise (quantile) and a joint steering: all go through traced hooks."""
    return actsteer.fit(
        tiny_llama, tokenizer, neutral[:32], football[:32], modules=MODULES, gate="token",
        method=request.param, progress=False,
    ).extrapolated(2.0)  # fmt: skip


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_a_compiled_model_is_steered_and_lambda_changes_compile_nothing(
    model, steering, tokenizer, neutral
):
    ids = tokenizer(neutral[90:92], return_tensors="pt", padding=True).input_ids
    per_row = torch.tensor([0.5, 1.5])
    with torch.no_grad():
        plain = model(ids).logits
        eager = {}
        for lam in (1.0, 0.5):
            with steering.applied(model, lam, gated=False):
                eager[lam] = model(ids).logits
        with steering.applied(model, per_row, gated=False):
            eager["rows"] = model(ids).logits
        with steering.applied(model, 1.0):
            eager["gated"] = model(ids).logits
        model.forward = torch.compile(model.forward)
        compiled_plain = model(ids).logits
        with steering.applied(model, 1.0, gated=False) as handle:
            steered = model(ids).logits
            after_first_trace = graphs()
            handle.set_strength(0.5)
            half = model(ids).logits
            handle.set_strength(0.0)
            zero = model(ids).logits
            assert graphs() == after_first_trace, "λ changes compile nothing"
            handle.set_strength(per_row)
            rows = model(ids).logits
        with steering.applied(model, 1.0) as handle:
            gated = model(ids).logits
            assert next(iter(handle.gates.values())).last is not None
        after = model(ids).logits
    assert (eager[1.0] - plain).abs().max() > 1e-3, "the steering changes the logits"
    for got, want in ((steered, eager[1.0]), (half, eager[0.5]), (rows, eager["rows"])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gated, eager["gated"], rtol=1e-5, atol=1e-5)
    assert torch.equal(zero, compiled_plain), "λ = 0: the compiled plain model, bit for bit"
    torch.testing.assert_close(after, plain, rtol=1e-5, atol=1e-5)
    assert (after - eager[1.0]).abs().max() > 1e-3, "removed: it steers no more"


def test_a_model_compiled_while_steered_switches_to_traced_hooks(model, steering, tokenizer):
    ids = tokenizer(["The weather today is"], return_tensors="pt").input_ids
    with torch.no_grad():
        with steering.applied(model, 0.5, gated=False):
            eager = model(ids).logits
        with steering.applied(model, 1.0, gated=False) as handle:
            model.forward = torch.compile(model.forward)
            model(ids)  # traced with the hooks of λ = 1 as they were
            handle.set_strength(0.5)  # the compiled code is noticed: traced hooks from now on
            assert all(hook.traced for hook in handle.hooks.values())
            compiled = model(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_what_traced_hooks_cannot_carry_is_refused_on_a_compiled_model(model, steering):
    model.forward = torch.compile(model.forward)
    for chosen, positions in (
        (steering, "prompt"),
        (steering.with_gate_settings(kind="context"), "all"),
    ):
        with (
            pytest.raises(ActSteerError, match="runs compiled code"),
            chosen.applied(model, 1.0, positions=positions),
        ):
            pass
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())
