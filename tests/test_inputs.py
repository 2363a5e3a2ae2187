"""Inputs people have (.txt, .jsonl, .csv, hf: datasets, --prompts) and instruct models'
chat template (--chat, chat=True)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import actsteer
from actsteer import cli
from actsteer.chat import chat_texts
from actsteer.errors import ActSteerError
from actsteer.texts import read_texts


def test_txt_jsonl_and_csv(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \n")
    assert read_texts(tmp_path / "a.txt") == ["one", "two"]
    rows = [{"text": "first", "label": 1}, {"text": "second", "label": 0}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_texts(tmp_path / "a.jsonl") == ["first", "second"]
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
    assert read_texts(tmp_path / "b.jsonl", field="body") == ["x", "y"]
    with pytest.raises(ActSteerError, match=r"line 1 has no field 'text' \(it has: body\)"):
        read_texts(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('"plain string"\n{oops\n')
    with pytest.raises(ActSteerError, match="line 2 is not JSON"):
        read_texts(tmp_path / "c.jsonl")
    (tmp_path / "a.csv").write_text('id,comment\n1,"hello, world"\n2,bye\n')
    assert read_texts(tmp_path / "a.csv", field="comment") == ["hello, world", "bye"]
    with pytest.raises(ActSteerError, match=r"no column 'text' \(it has: id, comment\)"):
        read_texts(tmp_path / "a.csv")
    with pytest.raises(ActSteerError, match="--field is for .jsonl, .csv and hf: data"):
        read_texts(tmp_path / "a.txt", field="x")
    with pytest.raises(ActSteerError, match="is a folder, not a text file"):
        read_texts(tmp_path)


def test_hf_datasets(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"sentence": "from the hub"}\n{"sentence": "again"}\n')
    assert read_texts(f"hf:{folder}", field="sentence") == ["from the hub", "again"]


def test_an_unreachable_hub_dataset_says_to_give_a_local_file(monkeypatch):
    """fit --source hf:… offline: the advice is a local file for --source (fit has no --data)."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ActSteerError) as caught:
        read_texts("hf:someone/no-such-dataset-here", "--source")
    message = str(caught.value)
    assert "could not load the hub dataset hf:someone/no-such-dataset-here" in message
    assert "give the --source as a local .txt, .jsonl or .csv file" in message
    assert "--data" not in message


def test_chat_template(tokenizer):
    (text,) = chat_texts(tokenizer, ["Tell me about football."])
    assert "Tell me about football." in text and text.rstrip().endswith("assistant")
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ActSteerError, match="no chat template"):
        chat_texts(plain, ["x"])


def test_fit_with_chat(tiny_llama, tokenizer, neutral, football):
    plain = actsteer.fit(tiny_llama, tokenizer, neutral[:40], football[:40], progress=False)
    chat = actsteer.fit(
        tiny_llama, tokenizer, neutral[:40], football[:40], chat=True, progress=False
    )
    assert chat.info.data["chat"] is True and "chat" not in plain.info.data
    name = chat.modules[0]
    assert not torch.allclose(chat.maps[name].beta, plain.maps[name].beta)


@pytest.fixture
def tiny_cli(tiny_llama, tokenizer, monkeypatch):
    monkeypatch.setattr(cli.core, "load_model", lambda name, **placement: (tiny_llama, tokenizer))
    return CliRunner()


def test_cli_fit_and_generate_from_files_with_chat(tiny_cli, neutral, football, tmp_path):
    source, target = tmp_path / "s.jsonl", tmp_path / "t.csv"
    source.write_text("\n".join(json.dumps({"q": t}) for t in neutral[:40]) + "\n")
    target.write_text("q\n" + "\n".join(f'"{t}"' for t in football[:40]) + "\n")
    out = tmp_path / "s.safetensors"
    fit = ["fit", "--source", str(source), "--target", str(target), "-o", str(out)]
    result = tiny_cli.invoke(cli.app, [*fit, "--field", "q", "--chat"])
    assert result.exit_code == 0, result.output
    steering = actsteer.Steering.load(out)
    assert steering.info.data["chat"] is True and steering.info.data["source_texts"] == 40
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is your favourite sport?\nTell me a story.\n")
    result = tiny_cli.invoke(
        cli.app,
        ["generate", "--steering", str(out), "--prompts", str(prompts), "--chat"]
        + ["--max-new-tokens", "3", "-s", "0", "1"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "favourite sport" in result.output and "im_start" not in result.output
    refused = tiny_cli.invoke(cli.app, ["eval", "perplexity", "--chat"])
    assert refused.exit_code == 1 and "toxicity, concept" in refused.output


def test_cli_sweep_with_chat_formats_only_the_generation_tasks(tiny_cli, monkeypatch, tmp_path):
    from actsteer.evaluation import sweep

    seen = {}

    def run_sweep(model, tok, steerings, options, strengths, out, **kwargs):
        seen.update(options)
        return {"entries": []}

    monkeypatch.setattr(sweep, "run_sweep", run_sweep)
    out = str(tmp_path / "r.json")
    command = ["sweep", "-t", "perplexity", "-t", "concept", "--set", "concept.concept=book"]
    result = tiny_cli.invoke(cli.app, [*command, "--chat", "-o", out])
    assert result.exit_code == 0, result.output
    assert seen["concept"] == {"concept": "book", "sampling": {"chat": True}}
    assert seen["perplexity"] == {}  # scores its text as it is
    refused = tiny_cli.invoke(cli.app, ["sweep", "-t", "perplexity", "--chat", "-o", out])
    assert refused.exit_code == 1 and "none of these tasks generates" in refused.output
