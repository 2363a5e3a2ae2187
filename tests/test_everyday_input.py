"""Everyday use, tried again (issue 26): inputs that used to pass silently get a clear answer,
and `actsteer --version` says what is installed."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import actsteer
from actsteer import ActSteerError, cli
from actsteer.generation import generate_grid
from actsteer.maps import AffineMap

FIRST_TWO = r"model\.layers\.[01]\..*"


def test_the_version_is_one_flag_away():
    run = subprocess.run(
        [sys.executable, "-m", "actsteer", "--version"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == f"actsteer {actsteer.__version__}"


def test_an_empty_module_list_is_refused_not_the_default(tiny_llama, tokenizer, neutral, football):
    with pytest.raises(ActSteerError, match="names no module .*empty list"):
        actsteer.fit(tiny_llama, tokenizer, neutral[:8], football[:8], modules=[])


def test_source_and_target_alike_are_refused(tiny_llama, tokenizer, neutral):
    with pytest.raises(ActSteerError, match="the same texts: a steering between them moves"):
        actsteer.fit(tiny_llama, tokenizer, neutral[:8], list(reversed(neutral[:8])))


def test_a_fixed_strength_that_is_no_number_is_named(tmp_path, tiny_llama, tokenizer, neutral,
                                                     football):  # fmt: skip
    from typer.testing import CliRunner

    from actsteer import cli

    path = actsteer.fit(tiny_llama, tokenizer, neutral[:8], football[:8]).save(
        tmp_path / "s.safetensors"
    )
    result = CliRunner().invoke(cli.app, ["generate", "--steering", f"{path}:abc", "Hi"])
    assert result.exit_code != 0
    assert "a fixed strength goes after ':' as a number" in result.output
    assert f"{path}:0.5" in result.output


@pytest.mark.parametrize("spec", ["0:1:0", "1:0:0.5", "0:1:-1"])
def test_a_range_with_no_step_says_what_a_range_needs(spec):
    from actsteer.strengths import parse_strengths

    with pytest.raises(ActSteerError, match="needs STEP > 0 and STOP ≥ START"):
        parse_strengths(spec)


def test_a_folded_model_knows_what_was_folded_into_it(
    tiny_llama, tokenizer, neutral, football, tmp_path
):
    """Folding records the steering in the config (saved with the checkpoint): applying or
    folding the same steering again is refused plainly, and a steering fitted on the original
    is told why it does not fit the folded export."""
    import copy

    from transformers import AutoModelForCausalLM

    steering = actsteer.fit(
        tiny_llama, tokenizer, neutral[:32], football[:32], modules="post-attn-ln", support="all"
    )
    model = steering.fold(copy.deepcopy(tiny_llama), 0.5)
    (record,) = model.config.actsteer_folded
    assert record["digest"] == steering.digest() and record["strength"] == 0.5
    for again in (lambda: steering.fold(model), lambda: steering.applied(model).__enter__()):
        with pytest.raises(ActSteerError, match="already folded into this model's weights .*0.5"):
            again()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ActSteerError, match="already folded"):
        steering.applied(reloaded).__enter__()
    other = actsteer.fit(
        tiny_llama, tokenizer, football[:32], neutral[:32], modules="post-attn-ln", support="all"
    )
    with pytest.raises(
        ActSteerError, match="no parameter .*folded export .*apply them to the orig"
    ):
        other.applied(reloaded).__enter__()
    with other.applied(tiny_llama, 0.5):  # the original still takes it
        pass


@pytest.fixture
def norms_steering(tiny_llama, tokenizer, neutral, football):
    return actsteer.fit(
        tiny_llama, tokenizer, neutral[:32], football[:32], modules="post-attn-ln", support="all"
    )


def last_logits(model, tokenizer, steering=None):
    enc = tokenizer(["The weather today is"], return_tensors="pt")
    with torch.inference_mode():
        if steering is None:
            return model(**enc).logits
        with steering.applied(model, 1.0):
            return model(**enc).logits


def test_select_applies_some_modules_without_refitting(tiny_llama, tokenizer, norms_steering):
    """select keeps the chosen maps as they are: applying it is applying the full steering
    with the other modules' maps at identity; a pattern and a list of names agree."""
    full = norms_steering
    some = full.select(FIRST_TWO)
    assert some.modules == ["model.layers.0.post_attention_layernorm",
                            "model.layers.1.post_attention_layernorm"]  # fmt: skip
    assert some.select(some.modules).digest() == some.digest()
    assert all(some.maps[n] is full.maps[n] for n in some.modules)
    identity = AffineMap(
        torch.ones_like(full.maps["model.layers.2.post_attention_layernorm"].omega),
        torch.zeros_like(full.maps["model.layers.2.post_attention_layernorm"].beta),
        full.maps["model.layers.2.post_attention_layernorm"].bounds,
    )
    padded = actsteer.Steering({**some.maps, "model.layers.2.post_attention_layernorm": identity},
                               full.info)  # fmt: skip
    plain = last_logits(tiny_llama, tokenizer)
    selected = last_logits(tiny_llama, tokenizer, some)
    torch.testing.assert_close(selected, last_logits(tiny_llama, tokenizer, padded))
    assert not torch.allclose(selected, plain) and not torch.allclose(
        selected, last_logits(tiny_llama, tokenizer, full)
    )


def test_select_says_what_it_could_not_find(norms_steering):
    for modules, message in [
        (r"model\.layers\.9\..*", "match none of this steering's modules .*whole names"),
        ("layers.[", "is not a regular expression"),
        (["model.layers.0.mlp"], "has no module 'model.layers.0.mlp'; its modules are"),
    ]:
        with pytest.raises(ActSteerError, match=message):
            norms_steering.select(modules)


def test_select_keeps_the_gates_of_the_modules_kept(tiny_llama, tokenizer, neutral, football):
    gated = actsteer.fit(
        tiny_llama, tokenizer, neutral[:32], football[:32], modules="post-attn-ln", gate="token",
        progress=False,
    )  # fmt: skip
    some = gated.select(FIRST_TWO)
    assert set(some.gates) == set(some.modules) and some.gate_settings == gated.gate_settings


@pytest.fixture
def tiny_cli(tiny_llama, tokenizer, monkeypatch):
    fresh = lambda name, **placement: (copy.deepcopy(tiny_llama), tokenizer)  # noqa: E731
    monkeypatch.setattr(cli.core, "load_model", fresh)
    return CliRunner()


def test_generate_json_with_some_modules(tiny_cli, tiny_llama, tokenizer, norms_steering, tmp_path):
    """generate --json --modules: one JSON object whose texts are what the Python API gives
    for the selected steering; the table says how it decoded."""
    path = norms_steering.save(tmp_path / "s.safetensors")
    args = ["generate", "--steering", str(path), "--strength", "0", "1", "--max-new-tokens", "4"]
    done = tiny_cli.invoke(cli.app, [*args, "--modules", FIRST_TWO, "--json", "--", "Hi", "Ok"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["strengths"] == [0.0, 1.0] and result["modules"] == FIRST_TWO
    assert result["decoding"] == {"max_new_tokens": 4, "do_sample": False,
                                  "repetition_penalty": 1.3}  # fmt: skip
    expected = generate_grid(
        tiny_llama, tokenizer, ["Hi", "Ok"], [0.0, 1.0], norms_steering.select(FIRST_TWO),
        max_new_tokens=4, do_sample=False, repetition_penalty=1.3,
    )  # fmt: skip
    assert [r["texts"] for r in result["results"]] == [[t.strip() for t in r] for r in expected]
    assert [r["prompt"] for r in result["results"]] == ["Hi", "Ok"]
    table = tiny_cli.invoke(cli.app, [*args, "--", "Hi"], env={"COLUMNS": "300"})
    assert "greedy, repetition penalty 1.3 (model.generate and actsteer serve use 1" in (
        table.stdout
    )
    wrong = tiny_cli.invoke(cli.app, [*args, "--modules", r"model\.nope", "--", "Hi"])
    assert wrong.exit_code != 0 and "match none of this steering's modules" in wrong.stderr


def test_export_and_serve_take_some_modules(tiny_cli, norms_steering, tmp_path, monkeypatch):
    path = norms_steering.save(tmp_path / "s.safetensors")
    out = tmp_path / "folded"
    args = ["export", "--steering", str(path), "-s", "0.5", "-o", str(out), "--modules", FIRST_TWO]
    done = tiny_cli.invoke(cli.app, args)
    assert done.exit_code == 0, done.output
    (record,) = json.loads((out / "config.json").read_text())["actsteer_folded"]
    assert record["digest"] == norms_steering.select(FIRST_TWO).digest()

    served = {}

    def capture(model, tokenizer, steerings, *rest):
        served.update(steerings)
        raise SystemExit(0)  # stop before uvicorn starts

    monkeypatch.setattr("actsteer.serving.app.Server", capture)
    args = ["serve", "--steering", f"s={path}", "--modules", FIRST_TWO, "--port", "8"]
    tiny_cli.invoke(cli.app, args)
    assert list(served) == ["s"] and served["s"].modules == norms_steering.select(FIRST_TWO).modules
