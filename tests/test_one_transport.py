"""Every place that applies a map goes through the one transport (actsteer.transport.Transport):
the Hugging Face hooks (every strength source), sequential fitting, LinEAS training and the
serving path (through the hooks); the vLLM plugin is checked in tests/vllm. With the fused
kernel on, a hook with no strength source is the kernel's own hook, which Transport also makes."""

from __future__ import annotations

import pytest
import torch

import actsteer
from actsteer import Steering
from actsteer.transport import Transport


@pytest.fixture
def calls(monkeypatch) -> list[tuple[tuple[int, ...], bool]]:
    """Each call of Transport: (the shape of the output it steered, whether its parameters
    carried a gradient). The fused kernel is off, so every hook is a Python hook."""
    monkeypatch.setenv("ACTSTEER_FUSED_KERNEL", "0")
    seen: list[tuple[tuple[int, ...], bool]] = []
    original = Transport.__call__

    def counted(self, a, strength):
        seen.append((tuple(a.shape), self.trained))
        return original(self, a, strength)

    monkeypatch.setattr(Transport, "__call__", counted)
    return seen


def prompt(tokenizer) -> dict[str, torch.Tensor]:
    return dict(tokenizer(["The match ended", "A quiet room"], return_tensors="pt", padding=True))


@pytest.mark.parametrize("positions", ["all", "prompt", "last"])
def test_hugging_face_hooks_steer_through_the_transport(
    calls, tiny_llama, tokenizer, neutral, football, positions
):
    steering = actsteer.fit(tiny_llama, tokenizer, neutral[:32], football[:32], progress=False)
    calls.clear()
    batch = prompt(tokenizer)
    with torch.no_grad():
        plain = tiny_llama(**batch).logits
        with steering.applied(tiny_llama, 0.7, positions=positions):
            steered = tiny_llama(**batch).logits
    assert len(calls) == len(steering.maps)
    assert all(shape[-1] == 32 and not trained for shape, trained in calls)
    assert not torch.equal(plain, steered)


def test_sequential_fitting_applies_upstream_maps_through_the_transport(
    calls, tiny_llama, tokenizer, neutral, football
):
    actsteer.fit(
        tiny_llama, tokenizer, neutral[:32], football[:32], mode="sequential", progress=False
    )
    assert calls, "the upstream maps moved the recorded activations"


def test_lineas_training_steers_through_the_transport(
    calls, tiny_llama, tokenizer, neutral, football
):
    actsteer.fit(
        tiny_llama, tokenizer, neutral[:32], football[:32], method="lineas", steps=2,
        progress=False,
    )  # fmt: skip
    trained = [shape for shape, trained in calls if trained]
    assert len(trained) >= 2 * 3, "each training step steered every module with trained maps"


def test_a_batch_with_one_strength_per_row_steers_through_the_transport(
    calls, tiny_llama, tokenizer, neutral, football
):
    """The server's path: one λ per row of the batch (its rows at λ = 0 unsteered)."""
    steering = actsteer.fit(tiny_llama, tokenizer, neutral[:32], football[:32], progress=False)
    calls.clear()
    batch = prompt(tokenizer)
    with torch.no_grad(), steering.applied(tiny_llama, torch.tensor([0.0, 1.0])):
        tiny_llama(**batch)
    assert len(calls) == len(steering.maps)


def test_with_the_kernel_a_plain_hook_is_the_kernel_hook_transport_makes(
    monkeypatch, tiny_llama, tokenizer, neutral, football
):
    from actsteer.kernels import fused_kernel

    if fused_kernel() is None:
        pytest.skip("the fused kernel is not built here")
    made = []
    original = Transport.kernel_hook

    def counted(self, *args):
        made.append(original(self, *args))
        return made[-1]

    monkeypatch.setattr(Transport, "kernel_hook", counted)
    steering: Steering = actsteer.fit(
        tiny_llama, tokenizer, neutral[:32], football[:32], progress=False
    )
    handle = steering.attach(tiny_llama, 0.5)
    try:
        assert len(made) == len(steering.maps) and all(hook is not None for hook in made)
        assert list(handle.forward_hooks.values()) == made
    finally:
        handle.remove()
