"""Sharing steerings the Hugging Face way (actsteer.hub): save_pretrained writes the artifact and
a model card, from_pretrained reads a folder or a hub repository. The hub path runs offline
through huggingface_hub's own cache layout (a snapshot written by the test, HF_HUB_OFFLINE=1)
in a fresh process, the way a user's second machine reads a steering published before."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import actsteer
from actsteer import ActSteerError, Steering

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def steering(tiny_llama, tokenizer, neutral, football, tmp_path_factory) -> Steering:
    """A steering whose default λ was calibrated (so its card carries a curve)."""
    fitted = actsteer.fit(
        tiny_llama, tokenizer, neutral[:32], football[:32], modules="post-attn-ln", progress=False
    )
    held_out = tmp_path_factory.mktemp("text") / "held_out.raw"
    held_out.write_text("\n".join(f" {line}" for line in neutral[40:100]) + "\n")
    tiny = {"passages": 4, "passage_tokens": 32, "offset": 0}
    return actsteer.calibrate(fitted, tiny_llama, tokenizer, 0.5, data=held_out, **tiny).steering


def front_matter(card: Path) -> dict:
    text = card.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def same(a: Steering, b: Steering) -> bool:
    return a.info == b.info and all(
        torch.equal(a.maps[n].omega, b.maps[n].omega)
        and torch.equal(a.maps[n].beta, b.maps[n].beta)
        for n in a.maps
    )


def test_save_pretrained_writes_the_artifact_and_a_model_card(steering, tmp_path):
    folder = steering.save_pretrained(tmp_path / "detox")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "steering.safetensors"]
    data = front_matter(folder / "README.md")
    assert data["library_name"] == "actsteer"
    assert "linear-act" in data["tags"] and "actsteer" in data["tags"]
    ours = data["actsteer"]
    assert ours["method"] == "linear-act" and ours["modules"] == steering.modules
    assert ours["default_strength"] == steering.info.default_strength
    assert ours["calibration"]["curve"] == [list(p) for p in steering.info.calibration["curve"]]
    assert ours["library_version"] == actsteer.__version__
    assert ours["data"]["source_texts"] == 32
    assert "base_model" not in data, "a model built from a config has no hub id"
    assert "Steering.from_pretrained" in (folder / "README.md").read_text()


def test_from_pretrained_reads_a_folder(steering, tmp_path):
    folder = steering.save_pretrained(tmp_path / "detox")
    assert same(Steering.from_pretrained(folder), steering)
    assert same(Steering.load(folder), steering), "load takes the folder too"
    with pytest.raises(ActSteerError, match="revision= applies to hub repositories"):
        Steering.from_pretrained(folder, revision="main")


def test_a_folder_without_the_artifact_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ActSteerError, match="holds no steering.safetensors"):
        Steering.load(tmp_path / "empty")


def test_a_hub_model_becomes_the_cards_base_model(steering, tmp_path):
    import dataclasses

    named = dataclasses.replace(
        steering, info=dataclasses.replace(steering.info, model_name="HuggingFaceTB/SmolLM2-135M")
    )
    data = front_matter(named.save_pretrained(tmp_path / "named") / "README.md")
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M"


def hub_cache(root: Path, repo: str, folder: Path) -> Path:
    """huggingface_hub's cache layout holding `folder` as repository `repo` at COMMIT."""
    cache = root / "hub"
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / COMMIT)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(COMMIT)
    return cache


def offline(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_a_hub_id_resolves_through_the_hugging_face_cache(steering, tmp_path):
    folder = steering.save_pretrained(tmp_path / "detox")
    cache = hub_cache(tmp_path, "someone/detox", folder)
    check = (
        "import sys, torch; from actsteer import Steering\n"
        "a = Steering.from_pretrained('someone/detox')\n"
        "b = Steering.load('hf:someone/detox@" + COMMIT + "')\n"
        "c = Steering.load(sys.argv[1])\n"
        "assert a.info == c.info == b.info\n"
        "assert all(torch.equal(a.maps[n].omega, c.maps[n].omega) for n in a.maps)\n"
        "try:\n"
        "    Steering.from_pretrained('someone/missing')\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    run = offline(cache, "-c", check, str(folder / "steering.safetensors"))
    assert run.returncode == 0, run.stderr
    assert "ActSteerError" in run.stdout
    assert "not in the local Hugging Face cache" in run.stdout


def test_the_cli_takes_a_hub_id_wherever_it_takes_a_steering_file(steering, tmp_path):
    cache = hub_cache(tmp_path, "someone/detox", steering.save_pretrained(tmp_path / "detox"))
    cli = "from actsteer.cli import app; app()"
    shown = offline(cache, "-c", cli, "inspect", "hf:someone/detox")
    assert shown.returncode == 0, shown.stderr
    assert "linear-act" in shown.stdout
    refused = offline(cache, "-c", cli, "inspect", "hf:not a repo")
    assert refused.returncode != 0
    assert "not a hub repository id" in refused.stderr + refused.stdout
