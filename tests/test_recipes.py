"""The command recipes in README.md and docs/llamacpp.md run as written (on the real SmolLM2,
in a folder holding the text files they name)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

import actsteer
from actsteer import cli
from tests.conftest import package_texts

ROOT = Path(__file__).resolve().parent.parent


def bash_commands(page: str, after: str) -> list[list[str]]:
    """The `actsteer …` commands of the first ```bash block after the line `after` (line
    continuations joined, comments dropped), as argument lists without the `actsteer`."""
    text = (ROOT / page).read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(after) :], flags=re.S)
    assert block, f"no bash block after {after!r} in {page}"
    lines = block[1].replace("\\\n", " ").splitlines()
    commands = [shlex.split(line, comments=True) for line in lines]
    return [c[1:] for c in commands if c[:1] == ["actsteer"]]


@pytest.fixture
def in_folder(tmp_path, monkeypatch, smol):
    """A working folder with the recipes' text files; commands get the session's SmolLM2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.core, "load_model", lambda name, **placement: smol)
    neutral, football = package_texts("neutral"), package_texts("football")
    for name, texts in [("neutral.txt", neutral), ("football.txt", football),
                        ("toxic.txt", football), ("clean.txt", neutral)]:  # fmt: skip
        (tmp_path / name).write_text("\n".join(texts[:64]) + "\n")
    return tmp_path


def invoke(args: list[str]) -> str:
    done = CliRunner().invoke(cli.app, args)
    assert done.exit_code == 0, f"actsteer {shlex.join(args)}\n{done.output}"
    return done.output


def test_the_readme_tour(in_folder):
    """fit, calibrate and generate as the README's tour writes them (calibrate on 4 WikiText
    windows and generate 4 tokens, to keep the test short; serve is tests/test_serve*.py's)."""
    fit, calibrate, generate, serve = bash_commands("README.md", "## A short tour")
    assert [fit[0], calibrate[0], generate[0], serve[0]] == [
        "fit",
        "calibrate",
        "generate",
        "serve",
    ]
    invoke(fit)
    invoke([*calibrate, "--passages", "4", "--passage-tokens", "64"])
    calibrated = actsteer.Steering.load(in_folder / "detox-cal.safetensors")
    assert calibrated.info.calibration is not None
    out = invoke([generate[0], "--max-new-tokens", "4", *generate[1:]])
    assert "The prompt" in out


def test_the_llama_cpp_recipe(in_folder):
    """A Mean-AcT steering of the whole residual stream exports as written: block 0 is left
    out, with a warning, and every other block is a direction."""
    fit, export = bash_commands("docs/llamacpp.md", "# llama.cpp")
    invoke(fit)
    out = invoke(export)
    assert "leaves out the map of the first block ('model.layers.0')" in out
    model, _ = cli.core.load_model("smollm2-135m")
    vector = actsteer.Steering.from_gguf(in_folder / "football.gguf", model)
    assert vector.modules == [f"model.layers.{k}" for k in range(1, 30)]
