"""No silent overwrite, no half-written file: existing outputs are refused unless --force, every
write lands in one rename, a failed fit or export leaves the old output as it was, and files get
the user's usual permissions (umask), not safetensors' 0600."""

from __future__ import annotations

import os
import stat

import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import actsteer
from actsteer import cli
from actsteer.errors import ActSteerError
from actsteer.export import export
from actsteer.outputs import check_output, written_file, written_folder


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_an_existing_output_is_refused_unless_forced(tmp_path):
    existing = tmp_path / "s.safetensors"
    existing.write_text("mine")
    with pytest.raises(ActSteerError, match="exists; choose another path, or pass --force"):
        check_output(existing)
    check_output(existing, force=True)
    check_output(tmp_path / "new.safetensors")
    folder = tmp_path / "out"
    folder.mkdir()
    check_output(folder)  # empty: fine
    (folder / "config.json").write_text("{}")
    with pytest.raises(ActSteerError, match="folder that is not empty"):
        check_output(folder)


def test_a_failed_write_leaves_the_old_file_and_no_scratch(tmp_path, umask_027):
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), written_file(path) as scratch:
        scratch.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old" and leftovers(tmp_path) == []
    with written_file(path) as scratch:
        assert scratch.parent == path.parent and scratch.suffix == ".json"
        scratch.write_text("new")
    assert path.read_text() == "new" and leftovers(tmp_path) == []
    assert mode(path) == 0o640


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path, umask_027):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's own file")
    with pytest.raises(RuntimeError), written_folder(folder) as scratch:
        (scratch / "config.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert leftovers(tmp_path) == []
    with written_folder(folder) as scratch:
        (scratch / "config.json").write_text("{}")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    assert leftovers(tmp_path) == [] and mode(folder) == 0o750
    assert mode(folder / "config.json") == 0o640


def test_artifacts_get_the_usual_permissions(tiny_llama, tokenizer, neutral, football, tmp_path):
    steering = actsteer.fit(tiny_llama, tokenizer, neutral[:8], football[:8], progress=False)
    old = os.umask(0o022)
    try:
        path = steering.save(tmp_path / "s.safetensors")
        assert mode(path) == 0o644, "not safetensors' 0600"
        steering.save(path)  # the library replaces (atomically); the CLI refuses without --force
    finally:
        os.umask(old)
    assert actsteer.Steering.load(path).modules == steering.modules
    assert leftovers(tmp_path) == []


def test_export_refuses_a_non_empty_folder_and_replaces_it_whole(
    tiny_llama, tokenizer, neutral, football, tmp_path
):
    import copy

    steering = actsteer.fit(tiny_llama, tokenizer, neutral[:8], football[:8], progress=False)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text('{"the user": "own config"}')
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ActSteerError, match="not empty"):
        export(steering, copy.deepcopy(tiny_llama), tokenizer, out, 0.5, "all")
    assert (out / "config.json").read_text() == '{"the user": "own config"}'
    export(steering, copy.deepcopy(tiny_llama), tokenizer, out, 0.5, "all", force=True)
    assert not (out / "notes.txt").exists(), "no foreign file left mixed in"
    assert (out / "actsteer_fold.json").exists() and leftovers(tmp_path) == []
    assert all(mode(p) == mode(out / "actsteer_fold.json") for p in out.iterdir())
    AutoModelForCausalLM.from_pretrained(out)


def test_cli_fit_refuses_an_existing_output_and_a_failed_fit_keeps_it(
    tiny_llama, tokenizer, neutral, football, tmp_path, monkeypatch
):
    monkeypatch.setattr(cli.core, "load_model", lambda name, **placement: (tiny_llama, tokenizer))
    source, target, out = tmp_path / "s.txt", tmp_path / "t.txt", tmp_path / "o.safetensors"
    source.write_text("\n".join(neutral[:8]) + "\n")
    target.write_text("\n".join(football[:8]) + "\n")
    fit = ["fit", "--source", str(source), "--target", str(target), "-o", str(out)]
    assert CliRunner().invoke(cli.app, fit).exit_code == 0
    first = out.read_bytes()
    refused = CliRunner().invoke(cli.app, [*fit, "--method", "mean-act"])
    assert refused.exit_code == 1 and "exists" in refused.output and "--force" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and out.read_bytes() == first
    failed = CliRunner().invoke(cli.app, [*fit, "--force", "--modules", "no\\.such\\.module"])
    assert failed.exit_code == 1 and out.read_bytes() == first, "a failed fit touches nothing"
    replaced = CliRunner().invoke(cli.app, [*fit, "--force", "--method", "mean-act"])
    assert replaced.exit_code == 0, replaced.output
    assert actsteer.Steering.load(out).method == "mean-act" and leftovers(tmp_path) == []


def test_cli_commands_that_write_take_force():
    """Every command that writes an output refuses an existing one and offers --force."""
    runner = CliRunner()
    for command in ("fit", "calibrate", "export", "eval", "generate-image", "inspect"):
        result = runner.invoke(cli.app, [command, "--help"], env={"COLUMNS": "200"})
        assert "--force" in result.output, command
