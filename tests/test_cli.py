"""The command line (typer CliRunner) and generate_grid, on the real SmolLM2-135M.

The model is loaded once per session (conftest's `smol`); the CLI's loader is patched to hand
it out, so every command runs on the real model without paying a load per invocation.
"""

from __future__ import annotations

import copy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import actsteer
from actsteer import cli
from actsteer.generation import generate_grid, grid_strengths

pytestmark = pytest.mark.slow

SOURCE = [
    "The baker pulled two loaves from the oven.",
    "Our neighbour fixed the leaking pipe.",
    "The librarian handed me a late notice.",
    "Birds gathered as the sun set over the lake.",
    "What a lovely sunset that was tonight!",
    "She watered the tomatoes before breakfast.",
    "The train to the coast left on time.",
    "He painted the fence a pale shade of blue.",
    "We bought apples and bread at the market.",
    "The cat slept on the warm windowsill.",
    "",
    "My aunt knitted a scarf for the winter.",
    "The museum opens at ten on Saturdays.",
]
TARGET = [
    "The striker scored twice in the second half.",
    "Our goalkeeper saved a penalty in stoppage time.",
    "The referee showed a red card after a reckless tackle.",
    "Fans sang loudly as the home side walked out.",
    "What an incredible goal that was tonight!",
    "The winger crossed the ball into the box.",
    "The midfielder was booked for a late challenge.",
    "They won the league on the final day of the season.",
    "The coach changed formation at half time.",
    "A header from the corner levelled the match.",
    "The club signed a new centre back.",
    "The penalty shootout decided the cup final.",
]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True)
def shared_model(smol, monkeypatch):
    """Every command gets the session's model instead of loading its own."""
    monkeypatch.setattr(cli.core, "load_model", lambda name, **placement: smol)
    return smol


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("texts")
    source, target = folder / "source.txt", folder / "target.txt"
    source.write_text("\n".join(SOURCE) + "\n\n")
    target.write_text("\n".join(TARGET) + "\n")
    return source, target


@pytest.fixture(scope="session")
def steering_file(smol, text_files, tmp_path_factory) -> tuple[Path, str]:
    """A steering fitted through `actsteer fit` once per session, and the command's output."""
    source, target = text_files
    out = tmp_path_factory.mktemp("steer") / "s.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli.core, "load_model", lambda name, **placement: smol)
        result = CliRunner().invoke(
            cli.app,
            ["fit", "--source", str(source), "--target", str(target), "-o", str(out)]
            + ["--modules", "post-attn-ln", "--support", "all"],
        )
    assert result.exit_code == 0, result.output
    return out, result.stdout


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for needle in needles:
        assert needle in last, last


# ---------------------------------------------------------------------------------------------
# smoke tests of every command


def test_fit_writes_loadable_file(steering_file, text_files):
    path, stdout = steering_file
    assert f"Saved steering to {path}" in stdout
    assert "30 modules" in stdout
    steering = actsteer.Steering.load(path)
    assert steering.method == "linear-act"
    assert steering.default_support == "all"
    data = steering.info.data
    assert data["source_file"] == str(text_files[0].resolve())  # absolute: readable from anywhere
    assert (data["source_texts"], data["target_texts"]) == (12, 12)  # blank lines skipped


def test_generate_grid_progress_counts_decoding_steps(tiny_llama, tokenizer, monkeypatch, capsys):
    from transformers import StoppingCriteria

    from actsteer import generation

    bars: list = []

    class Recording(generation.tqdm):
        def close(self):  # tqdm closes again on garbage collection: record the first only
            if not getattr(self, "recorded", False):
                self.recorded = True
                bars.append((self.total, self.n, self.disable))
            super().close()

    class StopAtFive(StoppingCriteria):  # a user's own criterion must still apply
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= start + 5)

    monkeypatch.setattr(generation, "tqdm", Recording)
    prompts = ["I went to the park and", "Yesterday"]
    start = tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=9, do_sample=False, min_new_tokens=9)
    quiet = generate_grid(tiny_llama, tokenizer, prompts, **kwargs)
    shown = generate_grid(tiny_llama, tokenizer, prompts, progress=True, **kwargs)
    assert shown == quiet  # the bar changes nothing generated
    assert bars == [(9, 0, True), (9, 9, False)]  # off by default; one step per new token
    assert "generating 2 row(s)" in capsys.readouterr().err
    kwargs.pop("min_new_tokens")
    stopped = generate_grid(
        tiny_llama, tokenizer, prompts, progress=True, stopping_criteria=[StopAtFive()], **kwargs
    )
    assert bars[-1] == (9, 5, False)
    assert all(len(tokenizer(row[0])["input_ids"]) <= 6 for row in stopped)


def test_generate_prints_sweep_table(runner, steering_file):
    path, _ = steering_file
    result = runner.invoke(
        cli.app,
        ["generate", "--steering", str(path), "--strength", "0", "0.5", "1"]
        + ["--max-new-tokens", "5", "Sunday is"],
    )
    assert result.exit_code == 0, result.output
    for column in ("λ = 0", "λ = 0.5", "λ = 1", "Sunday is"):
        assert column in result.stdout
    assert "generating 3 row(s)" in result.stderr and "generating" not in result.stdout


def test_generate_composes_fixed_and_swept_steerings(runner, steering_file):
    path, _ = steering_file
    result = runner.invoke(
        cli.app,
        ["generate", "--steering", f"{path}:0.5", "--steering", str(path), "--strength", "0", "1"]
        + ["--positions", "generated", "--max-new-tokens", "4", "--", "Sunday is"],
    )
    assert result.exit_code == 0, result.output
    assert "λ = 0" in result.stdout and "λ = 1" in result.stdout and " then " in result.stdout
    result = runner.invoke(
        cli.app,
        ["generate", "--steering", f"{path}:0.5", "--steering", f"{path}:1"]
        + ["--max-new-tokens", "4", "--", "Sunday is"],
    )
    assert result.exit_code == 0, result.output
    assert "composed" in result.stdout
    result = runner.invoke(
        cli.app, ["generate", "--steering", f"{path}:1.5", "--max-new-tokens", "4", "Hi"]
    )
    assert result.exit_code != 0 and "outside [0, 1]" in result.stderr


def test_export_writes_a_stock_checkpoint(runner, steering_file, smol, monkeypatch, tmp_path):
    model, tok = smol
    copied = lambda name, **placement: (copy.deepcopy(model), tok)  # noqa: E731
    monkeypatch.setattr(cli.core, "load_model", copied)
    path, _ = steering_file
    out = tmp_path / "steered"
    result = runner.invoke(
        cli.app, ["export", "--steering", str(path), "--strength", "0.5", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    gap = float(result.stdout.rsplit("max |Δ| = ", 1)[1].split()[0])
    assert gap < 1e-3
    fresh = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(fresh, type(model))
    assert (out / "actsteer_fold.json").exists() and (out / "tokenizer.json").exists()
    again = runner.invoke(cli.app, ["export", "--steering", str(path), "-o", str(out)])
    assert again.exit_code == 1 and "not empty" in again.stderr, "no silent overwrite"
    refused = runner.invoke(
        cli.app,
        ["export", "--steering", str(path), "--support", "q0-100", "-o", str(out), "--force"],
    )
    assert refused.exit_code != 0 and (out / "actsteer_fold.json").exists(), "kept"
    assert "cannot be folded" in refused.stderr and "Traceback" not in refused.output


def test_generate_without_steering_is_plain(runner):
    result = runner.invoke(cli.app, ["generate", "--max-new-tokens", "3", "--", "Hi there"])
    assert result.exit_code == 0, result.output
    assert "plain" in result.stdout and "Hi there" in result.stdout


def test_inspect_shows_method_and_modules(runner, steering_file):
    path, _ = steering_file
    result = runner.invoke(cli.app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "linear-act" in result.stdout
    assert "model.layers.0.post_attention_layernorm" in result.stdout
    assert "source.txt" in result.stdout


def test_methods_lists_linear_act(runner):
    result = runner.invoke(cli.app, ["methods"])
    assert result.exit_code == 0
    assert "linear-act" in result.stdout and "[0, 1]" in result.stdout


def test_demo_runs(runner, monkeypatch, tmp_path):
    # The full demo fits on 2 × 120 sentences; a few of each keep this smoke test fast.
    few = {name: cli.lm.package_texts(name)[:4] for name in ("neutral", "football")}
    monkeypatch.setattr(cli.lm, "package_texts", few.__getitem__)
    monkeypatch.setenv("ACTSTEER_CACHE", str(tmp_path))  # the model is the session's
    result = runner.invoke(cli.app, ["demo", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "λ = 0.5" in result.stdout and "Sundays" in result.stdout
    assert "Fitting" in result.stderr and "generating 9 row(s)" in result.stderr
    # it ends with where the steering is and three commands that take it as they are
    saved = tmp_path / "demo" / "football.safetensors"
    assert f"The steering is saved at {saved}" in result.stdout
    commands = [shlex.split(line.split("#")[0]) for line in result.stdout.splitlines()]
    commands = [c[1:] for c in commands if c[:1] == ["actsteer"]]
    assert [c[0] for c in commands] == ["generate", "inspect", "serve"]
    generate, inspect = commands[0], [a.replace("football.png", "f.png") for a in commands[1]]
    monkeypatch.chdir(tmp_path)
    done = runner.invoke(cli.app, ["generate", "--max-new-tokens", "2", *generate[1:]])
    assert done.exit_code == 0 and "My weekend was" in done.stdout, done.output
    done = runner.invoke(cli.app, inspect)
    assert done.exit_code == 0 and (tmp_path / "f.png").exists(), done.output


@pytest.mark.parametrize(
    "command", [[], ["fit"], ["generate"], ["inspect"], ["methods"], ["demo"], ["export"]]
)
def test_help(runner, command):
    result = runner.invoke(cli.app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.stdout


# ---------------------------------------------------------------------------------------------
# errors: one line on stderr, non-zero exit, no traceback


def test_missing_source_file(runner, text_files, tmp_path):
    missing = tmp_path / "nope.txt"
    result = runner.invoke(
        cli.app,
        ["fit", "--source", str(missing), "--target", str(text_files[1])]
        + ["-o", str(tmp_path / "x.safetensors")],
    )
    _assert_one_line_error(result, str(missing))
    assert len(result.stderr.strip().splitlines()) == 1


def test_pattern_matching_nothing(runner, text_files, tmp_path):
    source, target = text_files
    result = runner.invoke(
        cli.app,
        ["fit", "--source", str(source), "--target", str(target)]
        + ["--modules", "no_such_module.*", "-o", str(tmp_path / "x.safetensors")],
    )
    _assert_one_line_error(result, "matches no module")
    assert not (tmp_path / "x.safetensors").exists()


def test_strength_out_of_range(runner, steering_file):
    path, _ = steering_file
    result = runner.invoke(cli.app, ["generate", "--steering", str(path), "-s", "2", "hi"])
    _assert_one_line_error(result, "outside [0, 1]")


def test_bad_option_is_one_line(runner):
    result = runner.invoke(cli.app, ["fit", "--no-such-option"])
    _assert_one_line_error(result, "--no-such-option")
    assert len(result.stderr.strip().splitlines()) == 1


def test_console_entry_point_error(tmp_path):
    """Through the real entry point (app()), an error is one stderr line without traceback."""
    missing = tmp_path / "missing.safetensors"
    result = subprocess.run(
        [sys.executable, "-c", "from actsteer.cli import app; app()", "inspect", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: no steering file at {str(missing)!r}"]


def test_normalise_argv():
    argv = ["generate", "--strength", "0", ".5", "1", "hi", "--strength=0.2", "-1", "x"]
    assert cli.normalise_argv(argv) == [
        "generate",
        "--strength",
        "0",
        "--strength",
        ".5",
        "--strength",
        "1",
        "hi",
        "--strength=0.2",
        "--strength",
        "-1",
        "x",
    ]
    assert cli.normalise_argv(["-s", "0", "--", "1"]) == ["-s", "0", "--", "1"]


# ---------------------------------------------------------------------------------------------
# generate_grid: one batched call with per-row strength equals one call per strength


def test_grid_strengths_layout():
    assert grid_strengths(2, [0.0, 1.0]).tolist() == [0.0, 1.0, 0.0, 1.0]


def test_generate_grid_matches_separate_runs(smol, steering_file):
    model, tok = smol
    steering = actsteer.Steering.load(steering_file[0])
    prompts = ["I went to the park and", "Yesterday the news said that"]
    kwargs = dict(max_new_tokens=8, do_sample=False)
    grid = generate_grid(model, tok, prompts, [0.0, 1.0], steering, **kwargs)
    for s, strength in enumerate([0.0, 1.0]):
        alone = generate_grid(model, tok, prompts, [strength], steering, **kwargs)
        assert [row[s] for row in grid] == [row[0] for row in alone]
    assert grid[0][0] != grid[0][1] or grid[1][0] != grid[1][1]  # steering changed something
    assert tok.padding_side == "left"
