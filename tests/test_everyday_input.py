"""Everyday use, tried again (issue 26): inputs that used to pass silently get a clear answer,
and `actsteer --version` says what is installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

import actsteer
from actsteer import ActSteerError


def test_the_version_is_one_flag_away():
    run = subprocess.run(
        [sys.executable, "-c", "from actsteer.cli import app; app()", "--version"],
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
