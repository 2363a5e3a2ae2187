"""Every script in examples/ runs, as a user runs it (a fresh `python examples/X.py`), at a tiny
size, and shows what it promises. vllm_offline.py runs in tests/vllm (make test-vllm)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.test_diffusion import tiny_sd_pipeline

pytestmark = pytest.mark.slow  # the language-model examples load the real SmolLM2
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DATA = os.environ.get("ACTSTEER_DATA")


def run(script: str, *args: str, cwd: Path) -> str:
    """The script's stdout; its stderr too when it fails."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True, text=True, cwd=cwd, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_every_example_is_tested():
    tested = set(re.findall(r'"(\w+\.py)"', Path(__file__).read_text()))
    tested |= {"vllm_offline.py"}  # tests/vllm/test_examples.py
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.skipif(DATA is None, reason="needs ACTSTEER_DATA (ParaDetox and WikiText files)")
def test_detoxify_and_calibrate(tmp_path):
    fit = Path(DATA or "", "toxicity_fit")
    out = run(
        "detoxify_and_calibrate.py", "--source", str(fit / "source.txt"),
        "--target", str(fit / "target.txt"), "--pairs", "32", "--passages", "4",
        "--max-new-tokens", "8", "--output", "detox", cwd=tmp_path,
    )  # fmt: skip
    found = re.search(
        r"calibrated λ = ([\d.]+): perplexity [\d.]+ \+ ([-\d.]+) \(budget \+1\)", out
    )
    assert found, out
    assert float(found[1]) > 0 and float(found[2]) <= 1.0
    assert out.count("plain:") == 3 and (tmp_path / "detox" / "steering.safetensors").exists()


def test_concept_induction(tmp_path):
    out = run("concept_induction.py", "--texts", "64", "--max-new-tokens", "12", cwd=tmp_path)
    plain = re.findall(r"λ 0 +(.*)", out)
    full = re.findall(r"λ 1 +(.*)", out)
    assert len(plain) == len(full) == 3 and plain != full, out


def test_fold_and_export(tmp_path):
    out = run("fold_and_export.py", "--texts", "32", cwd=tmp_path)
    gap = float(re.search(r"max \|Δ\| = (\S+)", out)[1])  # type: ignore[index]
    assert gap < 1e-3, out
    assert (tmp_path / "football-folded" / "config.json").exists()
    assert (tmp_path / "football.gguf").stat().st_size > 0


def test_serve_and_call(tmp_path):
    out = run("serve_and_call.py", "--texts", "64", "--max-tokens", "12", cwd=tmp_path)
    replies = dict(re.findall(r"^ *(plain|football λ 1): (.*)$", out, flags=re.M))
    assert set(replies) == {"plain", "football λ 1"}, out
    assert replies["plain"] != replies["football λ 1"]


def test_text_to_image_style(tmp_path):
    tiny_sd_pipeline().save_pretrained(tmp_path / "pipe")
    out = run(
        "text_to_image_style.py", "--model", str(tmp_path / "pipe"), "--size", "8",
        "--denoising-steps", "2", "--guidance-scale", "4", "--output", "grid.png", cwd=tmp_path,
    )  # fmt: skip
    assert "saved grid.png" in out
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 3 * 8 and grid.height > 2 * 8
