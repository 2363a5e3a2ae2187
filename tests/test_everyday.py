"""What a new user hits first: folders given as text files, cut texts, little data, an unknown
hub id offline, a short repr, --extrapolate where the message says, export's support, and
tables that name the data actually read."""

from __future__ import annotations

import copy

import pytest
from typer.testing import CliRunner

import actsteer
from actsteer import cli
from actsteer.errors import ActSteerError
from actsteer.methods import get_method


@pytest.fixture
def tiny_cli(tiny_llama, tokenizer, monkeypatch):
    """The CLI loading a fresh copy of the tiny model each time, as it loads a checkpoint (an
    export folds into the model it loaded; the shared one must stay unfolded)."""
    fresh = lambda name, **placement: (copy.deepcopy(tiny_llama), tokenizer)  # noqa: E731
    monkeypatch.setattr(cli.core, "load_model", fresh)
    return CliRunner()


@pytest.fixture
def texts(tmp_path, neutral, football):
    source, target = tmp_path / "s.txt", tmp_path / "t.txt"
    source.write_text("\n".join(neutral[:40]) + "\n")
    target.write_text("\n".join(football[:40]) + "\n")
    return source, target


def one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_a_folder_given_as_a_text_file_says_so(tiny_cli, texts, tmp_path):
    args = ["fit", "--source", str(tmp_path), "--target", str(texts[1]), "-o", "x.safetensors"]
    message = one_line_error(tiny_cli.invoke(cli.app, args))
    assert "is a folder, not a text file" in message


def test_texts_cut_at_max_length_are_counted(tiny_llama, tokenizer, neutral, football):
    long = [" ".join([text] * 6) for text in neutral[:3]] + neutral[3:40]
    with pytest.warns(UserWarning, match=r"3 of 40 source texts are longer than max_length = 24"):
        actsteer.fit(tiny_llama, tokenizer, long, football[:40], max_length=24, progress=False)


def test_little_data_warns_with_its_rule(tiny_llama, tokenizer, neutral, football):
    with pytest.warns(UserWarning, match="8 texts in the smaller set; linear-act's per-unit"):
        actsteer.fit(tiny_llama, tokenizer, neutral[:40], football[:8], progress=False)
    with pytest.warns(UserWarning, match=r"8 \+ 8 texts for a probe over 32 units"):
        actsteer.fit(
            tiny_llama, tokenizer, neutral[:8], football[:8], method="iti-c", progress=False
        )
    assert get_method("actadd").small_data(1, 1, 32) is None, "ActAdd is meant for one pair"
    assert get_method("linear-act").small_data(32, 40, 32) is None


def test_cli_warnings_are_one_line(tiny_cli, neutral, football, tmp_path):
    source, target = tmp_path / "s.txt", tmp_path / "t.txt"
    source.write_text("\n".join(neutral[:8]) + "\n")
    target.write_text("\n".join(football[:8]) + "\n")
    out = tmp_path / "o.safetensors"
    result = tiny_cli.invoke(
        cli.app, ["fit", "--source", str(source), "--target", str(target), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if "little data" in line]
    assert line.startswith("warning: little data for linear-act: 8 texts")


def test_an_unknown_hub_id_offline_fails_at_once_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ActSteerError) as caught:
        actsteer.load_model("nobody-here/no-such-model")
    message = str(caught.value)
    assert "cannot be reached" in message and "127.0.0.1:9" in message and "\n" not in message


def test_repr_is_short(tiny_llama, tokenizer, neutral, football):
    steering = actsteer.fit(tiny_llama, tokenizer, neutral[:40], football[:40], progress=False)
    text = repr(steering)
    assert len(text) < 200 and "tensor" not in text
    for part in ("linear-act", "3 modules of 32 units", "λ in [0, 1]", "support q0-100"):
        assert part in text, text
    assert "λ in [0, 2]" in repr(steering.extrapolated(2.0))


def test_extrapolate_is_offered_where_the_message_says(
    tiny_cli, tiny_llama, tokenizer, neutral, football, tmp_path
):
    steering = actsteer.fit(tiny_llama, tokenizer, neutral[:40], football[:40], progress=False)
    path = steering.save(tmp_path / "s.safetensors")
    generate = ["generate", "--steering", str(path), "--max-new-tokens", "2"]
    message = one_line_error(tiny_cli.invoke(cli.app, [*generate, "-s", "1.5", "--", "Hi"]))
    commands = message.split("--extrapolate UPPER on ")[1].rstrip(")").replace(" and", ",")
    for command in [c.strip() for c in commands.split(",")]:
        help_text = tiny_cli.invoke(cli.app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "--extrapolate" in help_text, command
    result = tiny_cli.invoke(cli.app, [*generate, "-s", "1.5", "--extrapolate", "2", "--", "Hi"])
    assert result.exit_code == 0, result.output


def test_export_says_when_its_support_differs_from_generates(tiny_cli, texts, tmp_path):
    source, target = texts
    path = tmp_path / "s.safetensors"
    fit = ["fit", "--source", str(source), "--target", str(target), "-o", str(path)]
    assert tiny_cli.invoke(cli.app, fit).exit_code == 0
    result = tiny_cli.invoke(
        cli.app, ["export", "--steering", str(path), "-s", "0.5", "-o", str(tmp_path / "ck")]
    )
    assert result.exit_code == 0, result.output
    (note,) = [line for line in result.output.splitlines() if "note:" in line]
    assert "folded with support all" in note and "q0-100 by default" in note


def test_eval_names_the_data_it_read(tiny_cli, tmp_path, neutral):
    data = tmp_path / "my-text.raw"
    data.write_text("\n".join(neutral) + "\n")
    result = tiny_cli.invoke(
        cli.app,
        ["eval", "perplexity", "--data", str(data), "--set", "max_tokens=64", "--set", "window=32"],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 0, result.output
    assert "data: " in result.output and "my-text.raw" in result.output
    assert "WikiText" not in result.output
