"""Sequential ("causal") estimation is the paper's: both sets recorded at each module with the
maps of every upstream module applied — checked against the slow loop that defines it."""

from __future__ import annotations

import pytest
import torch

import actsteer
from actsteer.capture import Recorder, batches, forward_body, record, resolve_modules
from actsteer.methods import get_method
from actsteer.sequential import execution_order
from actsteer.tree import model_device


def reference_sequential(model, tok, source, target, names, support, pooling="mean"):
    """The definition, one full forward pass per module and set: record module k with the maps
    of all modules before it (execution order) applied at λ = 1, fit, go on."""
    method = get_method("linear-act")
    order = execution_order(model, tok, source[0], names)
    body = forward_body(model, names)
    maps = {}
    for name in order:
        upstream = actsteer.Steering(dict(maps))
        samples = {}
        for what, texts in (("source", source), ("target", target)):
            recorder = Recorder(model, [name], pooling, None)
            try:
                with torch.inference_mode(), upstream.applied(model, 1.0, support):
                    for batch in batches(tok, texts, 16, 128, model_device(model)):
                        recorder.mask = batch["attention_mask"].bool()
                        body(**batch, use_cache=False)
            finally:
                recorder.remove()
            samples[what] = recorder.samples()[name]
        maps[name] = method.fit(samples["source"], samples["target"])
    return maps


@pytest.mark.parametrize("support", ["q0-100", "all"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_sequential_equals_the_slow_reference_loop(
    tiny_llama, tokenizer, neutral, football, support, pooling
):
    source, target = neutral[:40], football[:40]
    names = resolve_modules(tiny_llama, "layernorms")  # two norms per block, then the final norm
    expected = reference_sequential(tiny_llama, tokenizer, source, target, names, support, pooling)
    fitted = actsteer.fit(
        tiny_llama, tokenizer, source, target, modules="layernorms", mode="sequential",
        support=support, pooling=pooling, progress=False,
    )  # fmt: skip
    assert fitted.modules == names
    for name in names:
        torch.testing.assert_close(
            fitted.maps[name].omega, expected[name].omega, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            fitted.maps[name].beta, expected[name].beta, rtol=1e-5, atol=1e-6
        )
        for bound, reference in zip(
            fitted.maps[name].bounds.values(), expected[name].bounds.values(), strict=True
        ):
            torch.testing.assert_close(bound, reference, rtol=1e-5, atol=1e-6)


def test_the_target_set_is_carried_too(tiny_llama, tokenizer, neutral, football):
    """Downstream of the first module, the maps differ from those fitted with the target
    recorded on the plain model (the earlier, source-only variant)."""
    source, target = neutral[:40], football[:40]
    names = resolve_modules(tiny_llama, "post-attn-ln")
    method = get_method("linear-act")
    fitted = actsteer.fit(
        tiny_llama, tokenizer, source, target, modules=names, mode="sequential", progress=False
    )
    plain_target = record(tiny_llama, tokenizer, target, names, progress=False)
    upstream = actsteer.Steering({names[0]: fitted.maps[names[0]]})
    with upstream.applied(tiny_llama, 1.0):
        source_at_1 = record(tiny_llama, tokenizer, source, names[1:2], progress=False)
    source_only = method.fit(source_at_1[names[1]], plain_target[names[1]])
    assert not torch.allclose(source_only.omega, fitted.maps[names[1]].omega, atol=1e-4)
